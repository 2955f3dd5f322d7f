# syntax=docker/dockerfile:1

# Both base images are pinned by digest (the tag is in the comment beside it): a tag moves
# with every upstream rebuild (Debian point releases, security fixes), and the same commit
# must not build into a different image from one day to the next. The pins go stale by
# design and must be refreshed deliberately: Renovate's and Dependabot's `docker` managers
# open pull requests for `FROM tag@sha256:...` lines; by hand, take the index digest of
#   docker buildx imagetools inspect rust:1.95-bookworm
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot
# Each digest is the multi-platform index, so `--platform` still picks the architecture.

# ---- build ------------------------------------------------------------------
# rust:1.95-bookworm
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
WORKDIR /src

# Dependencies first, against stub sources, so that editing our code does not rebuild the
# crates below it. Every workspace member needs its manifest and a stub here: the
# controller, `migration` and `simulator` (crate hcloud-simulator, which the controller
# depends on). Cargo.toml declares `[[bench]] controller` by path, so cargo cannot read the
# workspace without benches/controller.rs: a stub stands in for it in both builds (the
# image never builds benches). Examples and tests are discovered, so leaving them out is
# fine. Plain layers, not cache mounts, so the cache exports to a registry / CI cache.
COPY Cargo.toml Cargo.lock ./
# Build settings (.cargo/config.toml: SQLite's compile-time options), before anything builds.
COPY .cargo .cargo
COPY migration/Cargo.toml migration/Cargo.toml
COPY simulator/Cargo.toml simulator/Cargo.toml
RUN mkdir -p src migration/src simulator/src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/controller.rs \
    && touch src/lib.rs migration/src/lib.rs simulator/src/lib.rs \
    && cargo build --release --locked --bin vps-controller \
    && rm -rf src migration/src simulator/src

COPY src src
COPY migration/src migration/src
COPY simulator/src simulator/src
# The source revision, for vps_controller_build_info{revision=...} (read at compile time
# with option_env!). Declared after the dependency layer so a new revision does not
# rebuild the dependencies. `docker build --build-arg REVISION=$(git rev-parse HEAD) .`
ARG REVISION=unknown
ENV VPS_CONTROLLER_REVISION=$REVISION
# COPY keeps the context's mtimes, which may be older than the stub build: drop our own
# crates' fingerprints so cargo cannot reuse the stub artifacts.
RUN rm -rf target/release/.fingerprint/vps-controller-* \
        target/release/.fingerprint/migration-* \
        target/release/.fingerprint/hcloud-simulator-* \
    && cargo build --release --locked --bin vps-controller \
    && install -D -m 0755 target/release/vps-controller /out/usr/local/bin/vps-controller \
    && install -d /out/var/lib/vps-controller

# ---- runtime ----------------------------------------------------------------
# distroless/cc: glibc, libgcc_s and CA certificates, nothing else. The binary
# needs no more: TLS is rustls + ring, SQLite is bundled, PostgreSQL is sqlx.
# gcr.io/distroless/cc-debian12:nonroot
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vps-controller" \
      org.opencontainers.image.description="Reconciliation controller: subscriptions in a database converge to Hetzner Cloud servers, firewalls and SSH keys" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot" \
      org.opencontainers.image.base.digest="sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f"

COPY --from=builder /out/usr/local/bin/vps-controller /usr/local/bin/vps-controller
# The target does not exist in the base image, so --chown also applies to the
# directory COPY creates.
COPY --from=builder --chown=65532:65532 /out/var/lib/vps-controller /var/lib/vps-controller

# The default DATABASE_URL is a SQLite file relative to the working directory;
# this directory is the one place the non-root user may write. Production sets
# DATABASE_URL to PostgreSQL (required for more than one replica).
WORKDIR /var/lib/vps-controller
# 65532 is distroless' `nonroot` user (it has a passwd entry); numeric so that
# Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532

EXPOSE 9090
# No HEALTHCHECK: distroless has no shell or curl to run one. Orchestrators
# probe GET /healthz (liveness) and GET /readyz (readiness) on port 9090.
ENTRYPOINT ["/usr/local/bin/vps-controller"]
# Inside a container the metrics server must listen on all interfaces.
CMD ["run", "--listen", "0.0.0.0:9090", "--log-format", "json"]
