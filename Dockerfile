# One image for every recsys process: `recsys stream | aggregate | dashboard | produce | topics`
# (ENTRYPOINT is `recsys`), and for the Spark workers of docker-compose.yml, which must run the
# driver's Python (3.11) and Spark (pyspark 4.1.1) so Python UDFs and pickled closures work.
#
#   docker build -t recsys:0.1.0 .
#   docker run --rm recsys:0.1.0 config
#
# What `make setup` does, at build time: Maven resolves the pinned jars of jvm/pom.xml into
# jvm/lib/ (broker tools and Spark's Kafka/Avro connectors) and builds our GraphX bridge (jvm/src),
# pip installs the pinned tree of pyproject.toml + constraints.txt. Nothing is downloaded when a container runs.

# --- the jars (same pom, same profiles as `make setup`) ---------------------------------------
FROM maven:3.9.11-eclipse-temurin-17 AS jars
WORKDIR /build
COPY jvm/pom.xml jvm/pom.xml
COPY jvm/src jvm/src
RUN mvn -q -B -f jvm/pom.xml -P kafka dependency:copy-dependencies \
 && mvn -q -B -f jvm/pom.xml -P spark dependency:copy-dependencies \
 && mvn -q -B -f jvm/pom.xml -P bridge package \
 && touch jvm/lib/.installed

# --- the runtime -----------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# JDK 17 (Spark 4 needs a JDK, not only a JRE); tini reaps children and forwards SIGTERM.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      openjdk-17-jdk-headless tini procps \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /usr/lib/jvm/java-17
ENV JAVA_HOME=/usr/lib/jvm/java-17

WORKDIR /app

# Dependencies first (a layer that survives source edits), pinned by constraints.txt.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The source, installed in place: recsys/paths.py finds jvm/lib/ and data/ beside the packages.
COPY README.md ./
COPY recsys recsys
COPY schemas schemas
COPY streams streams
COPY spark spark
COPY visualizer visualizer
COPY data data
COPY jvm/pom.xml jvm/pom.xml
COPY --from=jars /build/jvm/lib jvm/lib
RUN pip install --no-deps -c constraints.txt -e . \
 && ln -s "$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')" /opt/spark \
 && useradd --system --uid 10001 --home-dir /var/lib/recsys --create-home recsys

# Spark workers of docker-compose.yml start from here: /opt/spark/bin/spark-class ...Worker
ENV SPARK_HOME=/opt/spark \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python \
    RECSYS_DATA_DIR=/var/lib/recsys \
    RECSYS_EXPORT_DIR=/var/lib/recsys/exports

USER recsys
WORKDIR /var/lib/recsys
VOLUME ["/var/lib/recsys"]
EXPOSE 5006 6066

ENTRYPOINT ["/usr/bin/tini", "--", "recsys"]
CMD ["--help"]
