# One image for web, worker and beat. On PyPI torch==2.13.0 is the CUDA build, which GPU workers need.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir torch==2.13.0
COPY . .
RUN pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
