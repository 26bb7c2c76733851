# kamal-proxy for Python: a small image that Kamal can run in place of the Go one.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY kamal_proxy ./kamal_proxy
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title=kamal-proxy \
      org.opencontainers.image.description="HTTP proxy for zero downtime deployments (Twisted)"
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --create-home --uid 1000 kamal-proxy \
    && mkdir -p /home/kamal-proxy/.config/kamal-proxy \
    && chown -R kamal-proxy:kamal-proxy /home/kamal-proxy/.config
# Kamal's own image runs as the named user too (its volume is that user's ~/.config).
# hadolint ignore=DL3066
USER kamal-proxy
VOLUME ["/home/kamal-proxy/.config/kamal-proxy"]
EXPOSE 80 443
CMD ["kamal-proxy", "run"]
