# Stand-in for the postgres:15 image where no container registry is reachable: Debian's
# PostgreSQL 15 on the local base (scripts/container-base.sh), with the part of the
# official entrypoint that compose.yaml uses (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB on first start; `postgres -c ...` as the command). compose.local.yaml.
ARG BASE=localhost/facegate-base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
VOLUME ["/var/lib/postgresql/data"]
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
