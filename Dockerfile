# optd in a container: a build stage with the compiler and -dev packages,
# and a runtime stage with only the shared libraries optd links.
#
#   docker build -t optd .
#   docker run -d -p 127.0.0.1:8080:8080 -v optd-data:/var/lib/optd \
#       -e OPTD_API_KEY=change-me optd
#
# Configuration is the OPTD_* environment (see `optd --help`); extra
# arguments to `docker run optd ...` are passed to optd as flags.
# clients/shell/test_docker.sh checks this file against build/optd.

FROM debian:bookworm-slim AS build
# libc6-dev is only a Recommends of gcc, so it is named here.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      gcc libc6-dev make pkg-config libmicrohttpd-dev libcjson-dev libsqlite3-dev \
      libcurl4-openssl-dev libcmocka-dev zlib1g-dev libgnutls28-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" build

FROM debian:bookworm-slim
# Exactly the libraries `ldd build/optd` resolves beyond the base image.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libmicrohttpd12 libcjson1 libsqlite3-0 libgnutls30 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/optd --no-create-home \
      --shell /usr/sbin/nologin optd \
 && install -d -o optd -g optd -m 0750 /var/lib/optd
COPY --from=build /src/build/optd /usr/local/bin/optd
ENV OPTD_BIND=0.0.0.0 OPTD_DB=/var/lib/optd/optd.db
USER 10001:10001
VOLUME /var/lib/optd
EXPOSE 8080
# optd probes its own /healthz (no API key needed), so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["optd","--check-health","http://127.0.0.1:8080"]
# SIGTERM: optd finishes in-flight requests and checkpoints hot sessions.
STOPSIGNAL SIGTERM
ENTRYPOINT ["optd"]
