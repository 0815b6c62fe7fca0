# One image for web, workers and beat, in two variants of torch 2.13.0:
#   docker build --build-arg TORCH_VARIANT=cpu  -t tunedeck:cpu .    (web, beat: no GPU, a far smaller image)
#   docker build --build-arg TORCH_VARIANT=cuda -t tunedeck:cuda .   (training and inference workers)
# The CUDA wheels carry their own CUDA runtime, so both start from the same slim Python; the GPU driver
# comes from the host through the NVIDIA Container Toolkit.
FROM python:3.11-slim

ARG TORCH_VARIANT=cuda
# On PyPI torch==2.13.0 is the CUDA build; the CPU build comes from PyTorch's own index.
RUN case "$TORCH_VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index=https://pypi.org/simple ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "$index" torch==2.13.0

WORKDIR /app
COPY . .
# torch is already there, so the project's torch range is met and pip does not fetch another build.
# The CUDA image adds the GPU extra (Liger Kernel); the CPU image has no use for it.
RUN if [ "$TORCH_VARIANT" = cuda ]; then pip install --no-cache-dir -e ".[gpu]"; else pip install --no-cache-dir -e .; fi

# Static files live in the image, not in the data volume, so a new image never serves old ones.
ENV PYTHONUNBUFFERED=1 \
    STATIC_ROOT=/app/staticfiles \
    TUNEDECK_DATA_DIR=/data \
    HF_HOME=/cache/huggingface
RUN python manage.py collectstatic --no-input --verbosity 0

# Not root: the data and cache directories are created here so named volumes start owned by this user.
RUN useradd --create-home --uid 1000 tunedeck && mkdir -p /data /cache/huggingface \
    && chown -R tunedeck /data /cache
USER tunedeck
EXPOSE 8000
CMD ["gunicorn", "webapp.wsgi", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
