FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY adapters adapters
COPY consumers consumers
COPY sandboxer sandboxer
COPY extensions extensions
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["sandboxer", "worker"]
