# syntax=docker/dockerfile:1
# Build: a release binary with the toolchain image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin cascade && mkdir -p /out/state

# Run: a small distroless image, as a non-root user. TLS roots are bundled (rustls).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cascade /usr/local/bin/cascade
COPY config /etc/cascade
# The store's directory, owned by the runtime user (distroless has no shell to mkdir).
COPY --from=build --chown=65532:65532 /out/state /var/lib/cascade
VOLUME /var/lib/cascade
USER nonroot:nonroot
EXPOSE 8080
# `cascade healthcheck` asks /healthz (the image has no curl or shell).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/cascade", "healthcheck"]
ENV CASCADE_LISTEN=0.0.0.0:8080
ENV CASCADE_STORE=/var/lib/cascade/cascade.db
ENTRYPOINT ["/usr/local/bin/cascade"]
CMD ["serve", "--config", "/etc/cascade/cascade.yaml"]
