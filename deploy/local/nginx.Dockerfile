# Stand-in for the nginx image where no container registry is reachable: Debian's nginx
# (1.22) on the local base. 1.22 has no `resolve` in an upstream, so this image carries
# its own copy of compose.yaml's balancer (nginx.conf here) that resolves the replicas
# once at start; podman-compose 1.0.3 does not mount compose `configs` (compose.local.yaml).
ARG BASE=localhost/facegate-base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
COPY nginx.conf /etc/nginx/conf.d/default.conf
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
