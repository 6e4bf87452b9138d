# The cocoon images (images/Dockerfile.*), for `docker buildx bake`:
#
#   docker buildx bake              # default: every variant but custom
#   docker buildx bake alpine       # one variant
#   docker buildx bake minimal      # alpine
#   docker buildx bake dev          # ubuntu, python, node
#   docker buildx bake all          # every target, custom included
#   docker buildx bake custom \
#     --set custom.args.CUSTOM_BASE=debian:bookworm \
#     --set custom.args.CUSTOM_PACKAGES="vim htop neovim postgresql-client"
#
#   REGISTRY=registry.example.com/me/cocoon VERSION=1.2.3 docker buildx bake --push
#
# Variants build for linux/amd64 and linux/arm64 (gpu: amd64 only), which
# needs a builder that can hold several platforms (docker buildx create
# --use) and --push; to load one platform into the local engine add
# --set '*.platform=linux/amd64' --load. images/lint checks this file.

# Where the images go: tags are REGISTRY:VARIANT and REGISTRY:ALIAS.
variable "REGISTRY" {
  default = "git.the-ihor.com/adi/cocoon"
}

# The version recorded in the images' org.opencontainers.image.version label.
variable "VERSION" {
  default = "dev"
}

# Every variant but custom.
group "default" {
  targets = ["alpine", "debian", "ubuntu", "python", "node", "full", "gpu"]
}

# The smallest image.
group "minimal" {
  targets = ["alpine"]
}

# The development images: general (ubuntu), Python and JavaScript; full and
# gpu are left out for their size.
group "dev" {
  targets = ["ubuntu", "python", "node"]
}

# Everything, custom (with its default arguments) included.
group "all" {
  targets = ["alpine", "debian", "ubuntu", "python", "node", "full", "gpu", "custom"]
}

# What every target shares: the repository root as context.
target "_common" {
  context = "."
  args = {
    VERSION = "${VERSION}"
  }
}

target "alpine" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.alpine"
  tags       = ["${REGISTRY}:alpine", "${REGISTRY}:minimal"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

target "debian" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.debian"
  tags       = ["${REGISTRY}:debian", "${REGISTRY}:slim"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

target "ubuntu" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.ubuntu"
  tags       = ["${REGISTRY}:ubuntu", "${REGISTRY}:latest"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

target "python" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.python"
  tags       = ["${REGISTRY}:python", "${REGISTRY}:py"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

target "node" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.node"
  tags       = ["${REGISTRY}:node", "${REGISTRY}:js"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

target "full" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.full"
  tags       = ["${REGISTRY}:full", "${REGISTRY}:all"]
  platforms  = ["linux/amd64", "linux/arm64"]
}

# CUDA images exist for amd64 (and sbsa arm64 servers, not covered here).
target "gpu" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.gpu"
  tags       = ["${REGISTRY}:gpu", "${REGISTRY}:cuda"]
  platforms  = ["linux/amd64"]
}

# Your own base and packages: set the args with --set custom.args.NAME=VALUE.
# No platforms: it builds for the builder's own, so --load works with any
# builder; add --set custom.platform=linux/amd64,linux/arm64 for both (the
# base must exist for each).
target "custom" {
  inherits   = ["_common"]
  dockerfile = "images/Dockerfile.custom"
  tags       = ["${REGISTRY}:custom"]
  args = {
    CUSTOM_BASE         = "debian:bookworm-slim"
    CUSTOM_PACKAGES     = ""
    CUSTOM_SETUP_SCRIPT = ""
  }
}
