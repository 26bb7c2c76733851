# kamal-proxy for Python: an image Kamal can run in place of basecamp/kamal-proxy.
# `make docker` builds it as kamal-proxy:v<version> (Kamal reads the version from the tag).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY constraints.txt setup.py pyproject.toml README.md ./
COPY kamal_proxy ./kamal_proxy
COPY twisted ./twisted
# Every dependency at the version of constraints.txt, so two builds of a commit are the same.
RUN pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG VERSION=0.9.2
ARG SOURCE=
ARG REVISION=
LABEL org.opencontainers.image.title=kamal-proxy \
      org.opencontainers.image.description="HTTP proxy for zero downtime deployments (Twisted)" \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.revision=$REVISION
COPY --from=build /wheels /wheels
# The user is the Go image's: kamal-proxy, uid and gid 1001. Kamal mounts one volume
# (kamal-proxy-config) on ~/.config/kamal-proxy whichever image runs, so both must own it.
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && groupadd --gid 1001 kamal-proxy \
    && useradd --create-home --uid 1001 --gid 1001 kamal-proxy \
    && mkdir -p /home/kamal-proxy/.config/kamal-proxy \
    && chmod 0700 /home/kamal-proxy/.config /home/kamal-proxy/.config/kamal-proxy \
    && chown -R kamal-proxy:kamal-proxy /home/kamal-proxy
# As the Go image, by name (the user exists in the image; its uid is 1001).
# hadolint ignore=DL3066
USER kamal-proxy:kamal-proxy
VOLUME ["/home/kamal-proxy/.config/kamal-proxy"]
EXPOSE 80 443
CMD ["kamal-proxy", "run"]
