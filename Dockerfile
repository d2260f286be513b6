FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY adapters adapters
COPY consumers consumers
COPY sandboxer sandboxer
COPY extensions extensions
COPY templates templates
# `--build-arg WITH_PACKER=1` for an image that runs `sandboxer templates` (Debian's
# Packer; docs/templates.md).
ARG WITH_PACKER=0
RUN if [ "$WITH_PACKER" = 1 ]; then apt-get update && apt-get install -y --no-install-recommends packer && rm -rf /var/lib/apt/lists/*; fi
# The modal extra: without it ext.modal is skipped (routes move on).
RUN pip install --no-cache-dir '.[modal]'
USER nobody
ENTRYPOINT []
CMD ["sandboxer", "worker"]
