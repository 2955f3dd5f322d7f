# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so that editing our code does not
# rebuild the crates below it (a new workspace member needs its stub here too).
# Plain layers, not cache mounts, so the cache exports to a registry / CI cache.
COPY Cargo.toml Cargo.lock ./
COPY migration/Cargo.toml migration/Cargo.toml
RUN mkdir -p src migration/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs migration/src/lib.rs \
    && cargo build --release --locked --bin vps-controller \
    && rm -rf src migration/src

COPY src src
COPY migration/src migration/src
# COPY keeps the context's mtimes, which may be older than the stub build:
# drop our own crates' fingerprints so cargo cannot reuse the stub binary.
RUN rm -rf target/release/.fingerprint/vps-controller-* target/release/.fingerprint/migration-* \
    && cargo build --release --locked --bin vps-controller \
    && install -D -m 0755 target/release/vps-controller /out/usr/local/bin/vps-controller \
    && install -d /out/var/lib/vps-controller

# ---- runtime ----------------------------------------------------------------
# distroless/cc: glibc, libgcc_s and CA certificates, nothing else. The binary
# needs no more: TLS is rustls + ring, SQLite is bundled, PostgreSQL is sqlx.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vps-controller" \
      org.opencontainers.image.description="Reconciliation controller: subscriptions in a database converge to Hetzner Cloud servers, firewalls and SSH keys" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

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
