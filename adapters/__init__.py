"""Everything that talks to the outside world, behind one seam.

- `base.py`: the seam, the `SandboxAdapter` Protocol and the values that cross it;
- `registry.py`: the manifests of `extensions/`, validated, and their adapters built;
- `routing.py`: which extension a provision goes to, and with which key;
- `shared.py`: what providers share (backoff, redaction, the usage formula);
- one module per provider: `e2b.py`, `modal.py`, `saas_stub.py` (the stand-in cloud);
- the services around them: `openbao.py` (provider keys), `finhub.py` (usage export).
"""
