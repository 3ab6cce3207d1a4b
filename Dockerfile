# syntax=docker/dockerfile:1
# Build: a release binary with the toolchain image.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin cascade

# Run: a small distroless image, as a non-root user. TLS roots are bundled (rustls).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cascade /usr/local/bin/cascade
COPY config /etc/cascade
USER nonroot:nonroot
EXPOSE 8080
ENV CASCADE_LISTEN=0.0.0.0:8080
ENTRYPOINT ["/usr/local/bin/cascade"]
CMD ["serve", "--config", "/etc/cascade/cascade.yaml"]
