FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TOLLWAY_HOST=0.0.0.0 TOLLWAY_PORT=8000 \
    TOLLWAY_DATABASE_URL=sqlite:////var/lib/tollway/tollway.db \
    TOLLWAY_RECEIPTS_DIR=/var/lib/tollway/receipts

WORKDIR /app
COPY pyproject.toml README.md ./
COPY config ./config
COPY ledger ./ledger
COPY billing ./billing
COPY proxy ./proxy
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /var/lib/tollway --create-home tollway

USER tollway
VOLUME ["/var/lib/tollway"]
EXPOSE 8000
# The port the server was told to use, not a hard-coded 8000.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os,sys,urllib.request; port=os.environ.get('TOLLWAY_PORT','8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["tollway", "serve"]
