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
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["tollway", "serve"]
