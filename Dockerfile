FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY adapters adapters
COPY consumers consumers
COPY sandboxer sandboxer
COPY extensions extensions
# The modal extra: without it ext.modal is skipped (routes move on).
RUN pip install --no-cache-dir '.[modal]'
USER nobody
ENTRYPOINT []
CMD ["sandboxer", "worker"]
