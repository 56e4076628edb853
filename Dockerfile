# key-evt-amqp: `docker build -t key-evt-amqp .`; configure with KEY_EVT_AMQP_* variables
# (README.md "Deploying"). A slim Python, the package installed into a virtualenv, a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY proxy ./proxy
RUN python -m venv /opt/key-evt-amqp && /opt/key-evt-amqp/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/key-evt-amqp /opt/key-evt-amqp
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin kea
USER kea
ENV PATH=/opt/key-evt-amqp/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KEY_EVT_AMQP_LISTEN=0.0.0.0:6380
EXPOSE 6380 9100
ENTRYPOINT ["key-evt-amqp", "serve"]
