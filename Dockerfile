# syntax=docker/dockerfile:1
# One image, three binaries: gateway, presence, broker-bridge (pick with `command`).
# Build: docker build -t switchboard/switchboard:0.1.0 .
# Binaries come from the `dist` profile (Cargo.toml): release code, stripped, no debug info.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka (bundled by rdkafka) builds with make, a C compiler and zlib.
RUN apt-get update && apt-get install -y --no-install-recommends make pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p gateway -p presence -p broker-bridge \
    && mkdir -p /out \
    && cp target/dist/gateway target/dist/presence target/dist/broker-bridge /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Non-root; the manifests also run with a read-only root filesystem.
USER 65532:65532
EXPOSE 8080 9090 9091 50051 50052
ENTRYPOINT []
CMD ["/usr/local/bin/gateway", "--help"]
