# strata CSI node plugin (and `strata controller`, the expansion forwarder).
#
# Stage 1 builds a wheel of strata and its Python dependencies; stage 2 is the slim
# runtime with only the kernel tools the layered drivers call:
#   util-linux (mount, losetup, blkid), btrfs-progs (btrfs driver), xfsprogs and
#   e2fsprogs (filesystems for thin devices and project quota), dmsetup and
#   thin-provisioning-tools (devicemapper thin pools), fuse-overlayfs (overlay where
#   the kernel's overlay cannot nest).
#
# The image runs as root on purpose: a CSI node plugin mounts filesystems, manages loop
# and device-mapper devices and propagates mounts into /var/lib/kubelet, which needs a
# privileged container with CAP_SYS_ADMIN; a non-root user could do none of it.
# (The chart runs the `strata controller` Deployment with the same image; it needs no
# privileges and the chart drops them there.)
#
# Versions are pinned: the base by its full tag, the Debian packages by the versions in
# bookworm (tests/deploy/test_dockerfile.py checks the list against what the drivers need;
# the image lane, tests/image/, builds this file with buildah against today's bookworm
# mirrors, so a pin bookworm no longer carries fails there). Without Docker Hub, pass a
# mirror of the base: --build-arg PYTHON_IMAGE=registry.example/python:3.11.14-slim-bookworm.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi ./csi
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="strata" \
      org.opencontainers.image.description="Kubernetes CSI driver serving volumes from node-local layered storage" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      util-linux=2.38.1-5+deb12u3 \
      mount=2.38.1-5+deb12u3 \
      btrfs-progs=6.2-1+deb12u2 \
      xfsprogs=6.1.0-1 \
      e2fsprogs=1.47.0-2+b2 \
      dmsetup=2:1.02.185-2 \
      thin-provisioning-tools=0.9.0-2 \
      fuse-overlayfs=1.10-1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels strata-csi==0.1.0 \
 && rm -rf /wheels
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["strata", "serve"]
