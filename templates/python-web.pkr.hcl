# The example template: what `sandboxer template build python-web` runs.
#
# A stand-in that needs no Docker engine (the machines this project is tested on have
# none): the `null` builder with a `shell-local` provisioner lays out a root file
# system, packs it as a tarball and writes its sha256 as the artifact's digest. A real
# deployment builds and pushes an OCI image with the `docker` builder instead: see
# docs/templates.md for that HCL. The contract with sandboxer is the same either way:
#   - it declares `variable "version"` (sandboxer passes the manifest's version);
#   - it ends with a `manifest` post-processor whose custom_data.image is the image
#     reference every provider pulls;
#   - the digest is the build's artifact_id (`sha256:...`), or else a file named
#     `digest` among the artifact's files (here the `artifice` post-processor's).
variable "version" {
  type = string
}

variable "registry" {
  type    = string
  default = "registry.local/sandboxer"
}

source "null" "image" {
  communicator = "none"
}

build {
  sources = ["source.null.image"]

  provisioner "shell-local" {
    inline = [
      "mkdir -p rootfs/app rootfs/etc",
      "echo 'python-web ${var.version}' > rootfs/etc/sandboxer-template",
      "printf 'print(\"hello from python-web\")\\n' > rootfs/app/main.py",
      "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf image.tar -C rootfs .",
      "printf 'sha256:%s' \"$(sha256sum image.tar | cut -c1-64)\" > digest",
    ]
  }

  post-processors {
    post-processor "artifice" {
      files = ["digest"]
    }
    post-processor "manifest" {
      custom_data = {
        image = "${var.registry}/python-web:${var.version}"
      }
    }
  }
}
