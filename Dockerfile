# asgd: one image for the parameter server and the workers (see docker-compose.yml).
#
#   docker build -t asgd .
#   docker run --rm asgd asgd --help
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /app

# torch first, in its own layer: the CPU build (plain `torch` pulls a several-GB CUDA build).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY setup.cfg pyproject.toml README.md ./
COPY asgd asgd
COPY server server
COPY worker worker
COPY configs configs
COPY examples examples
RUN pip install .

# Generate the default data set (MNIST-1D, made offline by the mnist1d package) once, into
# the image's cache, so the containers do not each generate it at start-up.
RUN python -c "from asgd.config import load_config; from asgd.tasks.data import load_dataset; \
c = load_config('configs/default.yaml'); load_dataset(c.data, seed=c.run.seed)"

EXPOSE 5555
CMD ["asgd", "--help"]
