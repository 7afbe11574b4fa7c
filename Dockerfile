# The dns-proxy agent image, for deploy/kubernetes/dns-proxy.yaml.
#   docker build -t dns-proxy:0.1.0 .
#
# Stage 1 provisions from Debian's packages only, as `cargo xtask setup` does where rustup has no
# rust-src (docs/building.md): rustc-web, cargo-web and rust-web-src (1.96, LLVM 22) from
# bookworm-security, and bpf-linker built from crates.io against llvm-22-dev. No rustup, no
# download outside Debian's archive and crates.io. Behind a proxy, pass
# `--build-arg http_proxy=... --build-arg https_proxy=...` (apt and cargo both use them); behind
# one that intercepts TLS, also its CA as PEM: `--build-arg EXTRA_CA_CERTS="$(cat ca.crt)"`
# (trusted in the build stage only; `cargo xtask test` passes /usr/local/share/ca-certificates).
# Stage 2 holds only the binary: the agent routes its address block itself (no init container,
# no iproute2), and the image has no compiler, cargo or shell tools beyond Debian's base.
ARG DEBIAN_RELEASE=bookworm
FROM debian:${DEBIAN_RELEASE} AS build
# Keep in step with xtask/src/provision.rs (BPF_LINKER_VERSION, the LLVM of rustc-web).
ARG BPF_LINKER_VERSION=0.13.0
ARG LLVM_MAJOR=22
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev \
        rustc-web cargo-web rust-web-src \
        llvm-${LLVM_MAJOR}-dev libzstd-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt \
        && update-ca-certificates; \
    fi
ENV CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
# Without LLVM_PREFIX, llvm-sys looks in /usr and the link fails (`-lLLVM` not found).
RUN LLVM_PREFIX=/usr/lib/llvm-${LLVM_MAJOR} cargo install --locked \
        "bpf-linker@${BPF_LINKER_VERSION}" --no-default-features --features "llvm-${LLVM_MAJOR}" \
    && rm -rf /opt/cargo/registry
WORKDIR /src
COPY . .
# dns-proxy/build.rs finds no rustup here and builds the eBPF programs with this rustc.
RUN cargo build --release --locked --package dns-proxy --bin dns-proxy

FROM debian:${DEBIAN_RELEASE}-slim
COPY --from=build /src/target/release/dns-proxy /usr/local/bin/dns-proxy
ENTRYPOINT ["/usr/local/bin/dns-proxy"]
CMD ["run"]
