# The dns-proxy agent image, for deploy/kubernetes/dns-proxy.yaml.
#   docker build -t dns-proxy:0.1.0 .
#
# Stage 1 builds with the same provisioning CI uses on a fresh Debian 12 (`cargo xtask setup`:
# the eBPF toolchain and bpf-linker); stage 2 holds only the binary (the agent routes its
# address block itself: no init container, no iproute2).
FROM debian:bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev git \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain 1.95.0
WORKDIR /src
COPY . .
RUN cargo xtask setup \
    && cargo build --release --locked --package dns-proxy --bin dns-proxy

FROM debian:bookworm-slim
COPY --from=build /src/target/release/dns-proxy /usr/local/bin/dns-proxy
ENTRYPOINT ["/usr/local/bin/dns-proxy"]
CMD ["run"]
