# syntax=docker/dockerfile:1
# sslscale for GPU clusters: torch, torchvision, NVIDIA DALI and NCCL at the versions the project is
# tested with (.ci/constraints.txt), sslscale with its console script, and SLURM's client tools so that
# a job running inside the image can requeue itself. docs/containers.md has the rest.
#
#   docker build -t sslscale:0.1.0 .
#   docker run --rm --gpus all --ipc=host sslscale:0.1.0 sslscale pretrain configs/quickstart.yaml train.max_steps=50
#   docker build --target compile -t sslscale:0.1.0-compile .   # with gcc and Python's headers: train.compile
#
# The base: torch 2.14.1's wheel is built for CUDA 13.0 and brings its CUDA libraries as pip packages
# (cuda-toolkit 13.0.3, cuDNN, NCCL), and so does DALI's cuda130 wheel. The CUDA "base" flavour of the
# same release adds what the container runtimes need (the CUDA runtime, the forward-compatibility
# libraries, NVIDIA_REQUIRE_CUDA for the driver check) and no second copy of cuBLAS & co., which the
# "runtime" flavour would add and nothing would load. tests/launch/test_container.py checks this tag against
# the cuda-toolkit release torch's metadata asks for.

FROM nvidia/cuda:13.0.3-base-ubuntu24.04 AS build

# apt packages are not pinned: an Ubuntu archive keeps only the newest build of a package, so a pin
# breaks the build at the next security update. What must not move is pinned: the base image's tag
# and every Python package (.ci/constraints.txt).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/sslscale/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv "$VIRTUAL_ENV"
WORKDIR /opt/sslscale/src

# The pinned heavy packages in a layer of their own, so that a change of sslscale's code does not
# download torch again. The versions come from the constraints file alone.
COPY .ci/constraints.txt .ci/constraints.txt
RUN "$VIRTUAL_ENV/bin/pip" install --no-cache-dir -c .ci/constraints.txt \
        torch torchvision nvidia-dali-cuda130 nvidia-nccl-cu13 submitit

# dev: pytest and scikit-learn, so the test suite runs inside the image (docs/containers.md);
# --build-arg EXTRAS=dali leaves them out.
ARG EXTRAS=dev
COPY . .
RUN "$VIRTUAL_ENV/bin/pip" install --no-cache-dir -c .ci/constraints.txt -e ".[${EXTRAS}]"


FROM nvidia/cuda:13.0.3-base-ubuntu24.04 AS runtime

# python3 without its -dev package: no compiler in this stage. slurm-client: scontrol, which submitit
# runs to requeue a job from inside it (it reaches the cluster through the host's munge socket and SLURM
# config, which launch/submit.py mounts; the munge key the package generates is not needed and removed).
# libibverbs1 + ibverbs-providers: NCCL's InfiniBand transport (without them NCCL falls back to TCP).
# dataset-fashion-mnist: the quickstart's data, so the smoke run and the tests need no mount.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 slurm-client \
        libibverbs1 ibverbs-providers dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/* /etc/munge/munge.key \
    && groupadd --gid 10001 sslscale \
    && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash sslscale

COPY --from=build /opt/sslscale /opt/sslscale
ENV VIRTUAL_ENV=/opt/sslscale/venv \
    PATH=/opt/sslscale/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /opt/sslscale/src
# The default run root (checkpoints/) is the one place in the image a run writes to; on a cluster the
# run root is a mounted folder instead (launch/submit.py mounts it at the same path as on the host).
RUN install -d -o 10001 -g 10001 checkpoints
# A numeric user: runtimes that look the name up on the host (Kubernetes' runAsNonRoot) cannot resolve a name.
USER 10001:10001
CMD ["sslscale", "--help"]


# train.compile: torch.compile builds code while the job runs (Triton's kernel launchers in C on a GPU,
# Inductor's C++ on a CPU), so it needs a compiler and Python's headers. They stay out of the default
# image; this target adds them to it. sslscale refuses train.compile on an image without them.
FROM runtime AS compile
USER 0:0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001


# The default target (a plain `docker build`): the runtime image, no compiler.
FROM runtime
