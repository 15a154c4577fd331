# syntax=docker/dockerfile:1
# The operator image: built in the official Rust image, shipped on distroless (glibc, CA
# certificates, no shell) as the non-root user 65532. Build: docker build -t IMAGE .

FROM docker.io/library/rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin imagebuild-operator \
    && cp target/release/imagebuild-operator /imagebuild-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /imagebuild-operator /usr/local/bin/imagebuild-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/imagebuild-operator"]
CMD ["run"]
