# recsys — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the project needs (browser tests drive Debian's Chromium; kcat for raw reads).
DEB_PACKAGES := chromium chromium-driver kcat openssl

export PYSPARK_PYTHON := $(CURDIR)/$(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(BIN)/python
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: help setup demo test test-unit test-spark test-integration test-browser test-reliability bench lint clean .debs-installed

help: ## show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

# Our GraphX bridge (Java, jvm/src/): compiled by the same pom into jvm/lib/spark/, on spark.jars.
BRIDGE_SRC := $(shell find jvm/src -name '*.java' 2>/dev/null)
BRIDGE_JAR := jvm/lib/spark/recsys-graphx-bridge.jar

setup: $(VENV)/.installed jvm/lib/.installed $(BRIDGE_JAR) .debs-installed ## install everything: venv, Maven jars, our GraphX bridge, Debian packages (idempotent)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==25.3
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

jvm/lib/.installed: jvm/pom.xml
	rm -rf jvm/lib
	mvn -q -B -f jvm/pom.xml -P kafka dependency:copy-dependencies
	mvn -q -B -f jvm/pom.xml -P spark dependency:copy-dependencies
	mvn -q -B -f jvm/pom.xml -P bridge package
	touch $@

# A changed bridge source rebuilds the bridge only (the resolved jars stay). The old jar is
# removed, not overwritten: a running Spark keeps reading the file it opened.
$(BRIDGE_JAR): $(BRIDGE_SRC) | jvm/lib/.installed
	rm -f $@
	mvn -q -B -f jvm/pom.xml -P bridge package
	touch $@

.debs-installed:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup ## run the main job on the embedded default (local broker, Spark local, bundled data)
	$(BIN)/recsys demo

test: setup lint ## run every test tier (starts its own broker, Spark, workers)
	$(BIN)/pytest

test-unit: $(VENV)/.installed ## unit tier: pure logic, no JVM, no broker (seconds)
	$(BIN)/pytest -m unit

test-spark: setup ## spark tier: a real local Spark session, no broker
	$(BIN)/pytest -m spark

test-integration: setup ## integration tier: real broker, Spark, Faust worker
	$(BIN)/pytest -m integration

test-browser: setup ## browser tier: a real Bokeh server in real headless Chromium
	$(BIN)/pytest -m browser

test-reliability: setup ## reliability tier: faults injected on the loopback cluster
	$(BIN)/pytest -m reliability

bench: setup ## run the benchmarks and print the ratios
	$(BIN)/python -m bench

lint: $(VENV)/.installed ## ruff
	$(BIN)/ruff check .

clean: ## remove local state (var/, exports/); keeps venv and jars
	rm -rf var exports
