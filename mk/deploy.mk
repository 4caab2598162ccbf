# Images and deployment to a Knative cluster (docs/deploy.md). Included by the root Makefile.
#
#   make images  IMAGE_REGISTRY=ghcr.io/me IMAGE_TAG=v1 IMAGE_PUSH=1
#   DB_PASSWORD=... DB_PASSWORD_TODO_COMMAND=... (every variable of SECRET_VARS) make secret
#   make deploy  IMAGE_REGISTRY=ghcr.io/me IMAGE_TAG=v1
#
# IMAGE_REGISTRY and IMAGE_TAG are the one place that says which images run: the manifests carry
# logical names (todo-cqrs-<service>, todo-cqrs-ops) and `make deploy` maps them through a kustomize
# overlay it writes under build/ (git-ignored).

# dev.local: Knative does not resolve tags of this registry to digests, so images loaded straight
# into the nodes (`kind load docker-image`, minikube's docker) run without any registry.
IMAGE_REGISTRY ?= dev.local
ifeq ($(origin IMAGE_TAG),undefined)
IMAGE_TAG := $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
endif
IMAGE_PUSH ?= 0
NAMESPACE ?= todo
KAFKA_NAMESPACE ?= kafka
# The Strimzi Kafka cluster (its CA Secret is <cluster>-cluster-ca-cert in KAFKA_NAMESPACE).
KAFKA_CLUSTER ?= my-cluster
# 1: the topic through knative/kafka-single-broker/ (one replica) for a single-broker trial cluster.
KAFKA_SINGLE_BROKER ?= 0
REDIS_ADDRESS ?= redis:6379
CONTAINER_CLI ?= docker
# The images' base: the Dockerfile's default. When it cannot be pulled (no registry reachable), the images
# build on LOCAL_BASE_IMAGE instead, made from Debian packages by `make base-image` and kept by the CLI.
PYTHON_IMAGE ?= docker.io/library/python:3.11.14-slim-bookworm
LOCAL_BASE_IMAGE ?= localhost/todo-cqrs-python-base:3.11-bookworm
BASE_IMAGE_CHOICE := build/base-image
PACK_BUILDER ?= gcr.io/buildpacks/builder:v1
DEPLOY_TIMEOUT ?= 300s
# What the ops image installs (versions from requirements.lock): migrations, read-model rebuild,
# dead-letter list/resend. Passed to the Dockerfile, whose default is the same list.
OPS_PACKAGES := alembic SQLAlchemy PyMySQL aiomysql greenlet orjson redis hiredis prometheus_client boto3 requests cloudevents

# A function is a folder of functions/ with a main.py; its image is named after its Knative Service.
FUNCTIONS := $(sort $(patsubst functions/%/main.py,%,$(wildcard functions/*/main.py)))
IMAGE_NAMES := $(subst _,-,$(FUNCTIONS)) ops
image_of = $(IMAGE_REGISTRY)/todo-cqrs-$(subst _,-,$(1)):$(IMAGE_TAG)

DEPLOY_DIR := build/deploy
TOPIC_DIR := build/kafka-topic
TOPIC_SOURCE := $(if $(filter 1,$(KAFKA_SINGLE_BROKER)),knative/kafka-single-broker,knative/kafka-topic.yaml)
OPS_DIR := build/ops
OPS_WITHOUT_IDENTITY_DIR := build/ops-without-sender-identity
KAFKA_SOURCE_DIR := build/kafka-source
KUSTOMIZE := kubectl kustomize --load-restrictor LoadRestrictionsNone

.PHONY: images images-cli images-pack image-base base-image secret deploy deploy-render verify-deploy \
        test-images cluster-rebuild cluster-dead-letters cluster-resend

# ---- images ------------------------------------------------------------------------------------------

# Deferred (=): probed only when `make images` runs, not on every make.
IMAGE_BUILDER = $(shell if $(CONTAINER_CLI) info >/dev/null 2>&1; then echo cli; \
                        elif command -v pack >/dev/null 2>&1; then echo pack; else echo none; fi)

images:  ## build an image per function and the ops image (IMAGE_REGISTRY, IMAGE_TAG; IMAGE_PUSH=1 pushes)
	@case "$(IMAGE_BUILDER)" in \
	  cli) $(MAKE) --no-print-directory images-cli ;; \
	  pack) $(MAKE) --no-print-directory images-pack ;; \
	  *) echo "make images: no image builder. It needs a running Docker daemon (or Podman:" \
	          "CONTAINER_CLI=podman), or the pack CLI. '$(CONTAINER_CLI) info' failed and 'pack' is not" \
	          "on PATH. Install one, or build the images elsewhere (CI) from the Dockerfile and" \
	          "deploy them with IMAGE_REGISTRY/IMAGE_TAG." >&2; exit 1 ;; \
	esac

images-cli: $(addprefix image-,$(FUNCTIONS)) image-ops
	@echo "built $(foreach n,$(IMAGE_NAMES),$(IMAGE_REGISTRY)/todo-cqrs-$(n):$(IMAGE_TAG))"

# Decides the base once per `make images` and writes it to build/base-image for the image-* rules.
image-base:
	@mkdir -p $(dir $(BASE_IMAGE_CHOICE))
	@if $(CONTAINER_CLI) image inspect $(PYTHON_IMAGE) >/dev/null 2>&1 \
	    || timeout 300 $(CONTAINER_CLI) pull -q $(PYTHON_IMAGE) >/dev/null 2>&1; then \
	  echo $(PYTHON_IMAGE) > $(BASE_IMAGE_CHOICE); \
	else \
	  if [ "$(IMAGE_PUSH)" = 1 ]; then echo "make images: $(PYTHON_IMAGE) cannot be pulled, and an image" \
	    "on the local base is for this machine only (it trusts this machine's CA bundle): not pushing." >&2; \
	    exit 1; fi; \
	  echo "make images: $(PYTHON_IMAGE) cannot be pulled; building on $(LOCAL_BASE_IMAGE) (make base-image)" >&2; \
	  $(MAKE) --no-print-directory base-image && echo $(LOCAL_BASE_IMAGE) > $(BASE_IMAGE_CHOICE); \
	fi

base-image:  ## a Python base image from Debian packages only (debootstrap; for machines that reach no registry)
	tools/deploy/base-image.sh "$(CONTAINER_CLI)" "$(LOCAL_BASE_IMAGE)"

image-ops: image-base
	$(CONTAINER_CLI) build --build-arg PYTHON_IMAGE=$$(cat $(BASE_IMAGE_CHOICE)) --target ops \
	  --build-arg OPS_PACKAGES="$(OPS_PACKAGES)" -t $(call image_of,ops) .
	$(if $(filter 1,$(IMAGE_PUSH)),$(CONTAINER_CLI) push $(call image_of,ops))

image-%: image-base
	$(CONTAINER_CLI) build --build-arg PYTHON_IMAGE=$$(cat $(BASE_IMAGE_CHOICE)) --build-arg FUNCTION=$* \
	  -t $(call image_of,$*) .
	$(if $(filter 1,$(IMAGE_PUSH)),$(CONTAINER_CLI) push $(call image_of,$*))

# Builds the images (`make images`, with podman or docker, whichever works, or CONTAINER_CLI=...) and runs
# each as its pod would: non-root, read-only root filesystem, /healthz, no error at start, a clean stop on
# SIGTERM; one behind Knative's queue-proxy. `make test` runs the same test.
test-images: $(STAMP)  ## build every image and run each as its pod would (tests/deploy/test_images.py)
	$(PY) -m pytest tests/deploy/test_images.py

# pack (Cloud Native Buildpacks, Google's builder, which runs functions-framework by itself): the
# function images only. Each is built from a staged folder: the function, the shared package beside
# it (functions-framework puts main.py's folder on sys.path) and requirements.lock as a constraint.
# The ops image needs docker or podman: its Jobs set `command:`, which bypasses a buildpack image's
# launcher.
images-pack: $(addprefix pack-image-,$(FUNCTIONS))
	@echo "pack built the function images. The ops image (migrations Job) needs docker or podman:" \
	      "docker build --target ops -t $(call image_of,ops) . (on any machine), then push it." >&2

pack-image-%:
	rm -rf build/pack/$* && mkdir -p build/pack/$*
	cp -R functions/$*/. todo_cqrs build/pack/$*/
	cp requirements.lock build/pack/$*/constraints.txt
	echo "-c constraints.txt" >> build/pack/$*/requirements.txt
	find build/pack/$* -name __pycache__ -prune -exec rm -rf {} +
	pack build $(call image_of,$*) --builder $(PACK_BUILDER) --path build/pack/$* \
	  --env GOOGLE_FUNCTION_TARGET=$* --env GOOGLE_PYTHON_VERSION=3.11.x $(if $(filter 1,$(IMAGE_PUSH)),--publish)

# ---- cluster -----------------------------------------------------------------------------------------

define require_kubectl
@command -v kubectl >/dev/null 2>&1 || { echo "make $@: kubectl is not installed. Install it" \
  "(https://kubernetes.io/docs/tasks/tools/) and point it at your cluster; see docs/deploy.md." >&2; exit 1; }
endef

define require_cluster
@kubectl get --raw /version >/dev/null 2>&1 || { echo "make $@: kubectl cannot reach a cluster" \
  "(context: $$(kubectl config current-context 2>/dev/null || echo none))." >&2; exit 1; }
endef

ensure_namespace = kubectl create namespace $(1) --dry-run=client -o yaml | kubectl apply -f - >/dev/null

# $(1): overlay folder build/<name>, $(2): what it renders (paths from the repository root; kustomize
# wants them relative to the overlay, hence ../../). Writes the overlay
# that sets the namespace and maps every logical image name to IMAGE_REGISTRY/...:IMAGE_TAG.
define render
@mkdir -p $(1)
@{ echo "# Written by mk/deploy.mk (make $@); do not edit."; \
   echo "apiVersion: kustomize.config.k8s.io/v1beta1"; echo "kind: Kustomization"; \
   echo "namespace: $(NAMESPACE)"; echo "resources:"; \
   $(foreach r,$(2),echo "  - ../../$(r)";) \
   echo "images:"; \
   $(foreach n,$(IMAGE_NAMES),echo "  - name: todo-cqrs-$(n)"; \
     echo "    newName: $(IMAGE_REGISTRY)/todo-cqrs-$(n)"; echo "    newTag: \"$(IMAGE_TAG)\"";) \
 } > $(1)/kustomization.yaml
@$(KUSTOMIZE) $(1) > $(1)/all.yaml
endef

# $(1): Job name. Polls until the Job completes or fails (a Job has no single condition to wait for
# that covers both), printing its log on failure.
define wait_job
@for i in $$(seq 1 120); do \
  state=$$(kubectl get -n $(NAMESPACE) job/$(1) -o jsonpath='{.status.conditions[?(@.status=="True")].type}'); \
  case " $$state " in \
    *" Complete "*) exit 0 ;; \
    *" Failed "*) kubectl logs -n $(NAMESPACE) job/$(1) --tail=100 >&2 || true; \
                  echo "make $@: job $(1) failed (log above)" >&2; exit 1 ;; \
  esac; sleep 5; \
done; echo "make $@: job $(1) did not finish in 10 minutes" >&2; exit 1
endef

# One Secret per role (knative/secret.example.yaml): each role's DB password, Redis ACL password and Kafka
# password come from the environment; the Redis ACL file is made from the same (todo_cqrs/roles.py), and
# the Kafka cluster's CA is copied from Strimzi's Secret in KAFKA_NAMESPACE (or KAFKA_CA_FILE).
SECRET_VARS := DB_PASSWORD DB_PASSWORD_TODO_COMMAND DB_PASSWORD_TODO_RELAY DB_PASSWORD_TODO_PROJECTION \
  DB_PASSWORD_TODO_QUERY DB_PASSWORD_TODO_RECONCILE REDIS_PASSWORD REDIS_PASSWORD_TODO_PROJECTION \
  REDIS_PASSWORD_TODO_QUERY REDIS_PASSWORD_TODO_RECONCILE KAFKA_PASSWORD_COMMAND KAFKA_PASSWORD_RELAY \
  KAFKA_PASSWORD_SOURCE CURSOR_SECRET AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
apply_secret = kubectl create secret generic $(1) -n $(NAMESPACE) $(2) --dry-run=client -o yaml \
  | kubectl label --local -f - app.kubernetes.io/part-of=todo-cqrs -o yaml | kubectl apply -f - >/dev/null \
  && echo "secret/$(1) applied"

secret:  ## create or update the Secrets, one per role, from the environment (SECRET_VARS; docs/deploy.md step 7)
	$(require_kubectl)
	@missing=""; for v in $(SECRET_VARS); do [ -n "$${!v:-}" ] || missing="$$missing $$v"; done; \
	if [ -n "$$missing" ]; then echo "make secret: set$$missing in the environment" \
	  "(docs/deploy.md step 7 generates them all; see knative/secret.example.yaml)" >&2; exit 1; fi
	$(require_cluster)
	@$(call ensure_namespace,$(NAMESPACE))
	@$(call apply_secret,todo-cqrs-command,--from-literal=DB_USER=todo_command \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD_TODO_COMMAND" \
	  --from-literal=KAFKA_SASL_USERNAME=todo-command --from-literal=KAFKA_SASL_PASSWORD="$$KAFKA_PASSWORD_COMMAND")
	@$(call apply_secret,todo-cqrs-relay,--from-literal=DB_USER=todo_relay \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD_TODO_RELAY" \
	  --from-literal=KAFKA_SASL_USERNAME=todo-relay --from-literal=KAFKA_SASL_PASSWORD="$$KAFKA_PASSWORD_RELAY")
	@$(call apply_secret,todo-cqrs-projection,--from-literal=DB_USER=todo_projection \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD_TODO_PROJECTION" \
	  --from-literal=REDIS_URL="redis://todo_projection:$$REDIS_PASSWORD_TODO_PROJECTION@$(REDIS_ADDRESS)/0")
	@$(call apply_secret,todo-cqrs-query,--from-literal=DB_USER=todo_query \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD_TODO_QUERY" \
	  --from-literal=REDIS_URL="redis://todo_query:$$REDIS_PASSWORD_TODO_QUERY@$(REDIS_ADDRESS)/0" \
	  --from-literal=CURSOR_SECRET="$$CURSOR_SECRET")
	@$(call apply_secret,todo-cqrs-reconcile,--from-literal=DB_USER=todo_reconcile \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD_TODO_RECONCILE" \
	  --from-literal=REDIS_URL="redis://todo_reconcile:$$REDIS_PASSWORD_TODO_RECONCILE@$(REDIS_ADDRESS)/0")
	@$(call apply_secret,todo-cqrs-admin,--from-literal=DB_USER="$${DB_USER:-todo}" \
	  --from-literal=DB_PASSWORD="$$DB_PASSWORD" \
	  --from-literal=REDIS_URL="redis://:$$REDIS_PASSWORD@$(REDIS_ADDRESS)/0")
	@$(call apply_secret,todo-cqrs-kafka-source,--from-literal=user=todo-kafka-source \
	  --from-literal=password="$$KAFKA_PASSWORD_SOURCE" --from-literal=saslType=SCRAM-SHA-512)
	@$(call apply_secret,todo-cqrs-s3,--from-literal=AWS_ACCESS_KEY_ID="$$AWS_ACCESS_KEY_ID" \
	  --from-literal=AWS_SECRET_ACCESS_KEY="$$AWS_SECRET_ACCESS_KEY")
	@acl=$$(mktemp) && trap 'rm -f "$$acl"' EXIT && python3 -m todo_cqrs.roles redis-acl > "$$acl" \
	  && $(call apply_secret,todo-cqrs-redis-acl,--from-file=users.acl="$$acl")
	@ca=$$(mktemp) && trap 'rm -f "$$ca"' EXIT && \
	if [ -n "$${KAFKA_CA_FILE:-}" ]; then cp "$$KAFKA_CA_FILE" "$$ca"; \
	else kubectl get secret -n $(KAFKA_NAMESPACE) $(KAFKA_CLUSTER)-cluster-ca-cert \
	  -o jsonpath='{.data.ca\.crt}' | base64 -d > "$$ca"; fi && [ -s "$$ca" ] || { \
	  echo "make secret: no Kafka CA: neither KAFKA_CA_FILE nor secret/$(KAFKA_CLUSTER)-cluster-ca-cert in" \
	    "namespace $(KAFKA_NAMESPACE) (install Strimzi's cluster first, docs/deploy.md step 3)" >&2; exit 1; } && \
	$(call apply_secret,todo-cqrs-kafka-ca,--from-file=ca.crt="$$ca")

deploy-render:  ## render what `make deploy` applies into build/ (offline; no cluster needed)
	$(require_kubectl)
	$(call render,$(DEPLOY_DIR),knative)
	@mkdir -p $(TOPIC_DIR) && $(if $(filter 1,$(KAFKA_SINGLE_BROKER)),$(KUSTOMIZE),cat) $(TOPIC_SOURCE) > $(TOPIC_DIR)/all.yaml
	$(if $(wildcard kafka-source.yaml),$(call render,$(KAFKA_SOURCE_DIR),kafka-source.yaml))
	$(call render,$(OPS_DIR),knative/ops)
	$(call render,$(OPS_WITHOUT_IDENTITY_DIR),knative/ops/without-sender-identity)
	@echo "rendered $(DEPLOY_DIR)/all.yaml, $(TOPIC_DIR)/all.yaml, $(KAFKA_SOURCE_DIR)/all.yaml, $(OPS_DIR)/all.yaml" \
	      "and $(OPS_WITHOUT_IDENTITY_DIR)/all.yaml" \
	      "(namespace $(NAMESPACE), images $(IMAGE_REGISTRY)/todo-cqrs-*:$(IMAGE_TAG))"

# A real kube-apiserver (built once, cached in ~/.cache/todo-cqrs/bin) with the cluster's CRDs, on loopback;
# every manifest applied with --dry-run=server --validate=strict as make deploy applies it, and each file
# of tests/deploy/broken/ refused. Stops what it started. See tools/deploy_check.py.
verify-deploy: $(STAMP)  ## apply every manifest to a real API server (dry run) and check the broken ones are refused
	$(require_kubectl)
	$(PY) -m tools.deploy_check --namespace $(NAMESPACE) --kafka-namespace $(KAFKA_NAMESPACE)

DEPLOY_SECRETS := todo-cqrs-command todo-cqrs-relay todo-cqrs-projection todo-cqrs-query todo-cqrs-reconcile \
  todo-cqrs-admin todo-cqrs-kafka-source todo-cqrs-kafka-ca todo-cqrs-s3

deploy: deploy-render  ## apply knative/ and kafka-source.yaml in order: config, access, topic, migrations, Services, sources, event policies
	$(require_cluster)
	@kubectl get crd services.serving.knative.dev pingsources.sources.knative.dev \
	  kafkasources.sources.knative.dev kafkatopics.kafka.strimzi.io kafkausers.kafka.strimzi.io >/dev/null || { \
	  echo "make deploy: the cluster lacks a CRD above: install Knative Serving, Knative Eventing," \
	    "the KafkaSource and Strimzi first (docs/deploy.md, steps 1-3)." >&2; exit 1; }
	@echo "==> namespace $(NAMESPACE) and ConfigMap"
	@$(call ensure_namespace,$(NAMESPACE))
	kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=config
	@kubectl get -n $(NAMESPACE) secret $(DEPLOY_SECRETS) >/dev/null || { \
	  echo "make deploy: create the Secrets first: make secret NAMESPACE=$(NAMESPACE)" \
	    "(docs/deploy.md step 7)" >&2; exit 1; }
	@echo "==> ServiceAccounts, NetworkPolicies, KafkaUsers"
	kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=access
	kubectl wait -n $(NAMESPACE) kafkauser -l app.kubernetes.io/part-of=todo-cqrs --for=condition=Ready \
	  --timeout=$(DEPLOY_TIMEOUT)
	@echo "==> Kafka topic (namespace $(KAFKA_NAMESPACE))"
	kubectl apply -n $(KAFKA_NAMESPACE) -f $(TOPIC_DIR)/all.yaml
	kubectl wait -n $(KAFKA_NAMESPACE) kafkatopic/todo-events --for=condition=Ready --timeout=$(DEPLOY_TIMEOUT)
	@echo "==> migrations"
	kubectl delete -n $(NAMESPACE) job/todo-cqrs-migrate --ignore-not-found --wait=true
	kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=migrations
	$(call wait_job,todo-cqrs-migrate)
	@echo "==> Knative Services"
	kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=function
	kubectl wait -n $(NAMESPACE) ksvc -l app.kubernetes.io/part-of=todo-cqrs --for=condition=Ready \
	  --timeout=$(DEPLOY_TIMEOUT)
	@echo "==> event sources: KafkaSource (kafka-source.yaml), PingSource"
	@test -f $(KAFKA_SOURCE_DIR)/all.yaml || { echo "make deploy: kafka-source.yaml is missing" >&2; exit 1; }
	kubectl apply -n $(NAMESPACE) -f $(KAFKA_SOURCE_DIR)/all.yaml
	kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=event-source
	kubectl wait -n $(NAMESPACE) kafkasource,pingsource --all --for=condition=Ready --timeout=$(DEPLOY_TIMEOUT)
	@echo "==> EventPolicies (who may deliver to the receivers; knative/eventpolicies.yaml)"
	@if $(oidc_enabled); then \
	  kubectl apply -n $(NAMESPACE) -f $(DEPLOY_DIR)/all.yaml -l app.kubernetes.io/component=event-policy; \
	else \
	  echo "skipped: Knative's authentication-oidc is off, so its webhook refuses EventPolicies and the" \
	    "sources send no token (docs/deploy.md, Sender identity)"; \
	fi
	@kubectl get -n $(NAMESPACE) ksvc

# ---- one-off jobs in the cluster (knative/ops/) ------------------------------------------------------

# True in a shell when Knative Eventing's authentication-oidc is on: the sources then have an identity.
oidc_enabled = [ "$$(kubectl get configmap config-features -n knative-eventing \
  -o jsonpath='{.data.authentication-oidc}' 2>/dev/null)" = enabled ]

# $(1): Job name; $(2): the rendered ops to take it from, $(OPS_DIR) when empty. Re-creates the Job (its
# pod template is immutable), waits for it, prints its log.
define run_ops_job
$(require_cluster)
$(call render,$(OPS_DIR),knative/ops)
kubectl delete -n $(NAMESPACE) job/$(1) --ignore-not-found --wait=true
kubectl apply -n $(NAMESPACE) -f $(or $(2),$(OPS_DIR))/all.yaml -l app.kubernetes.io/name=$(1)
$(call wait_job,$(1))
@kubectl logs -n $(NAMESPACE) job/$(1)
endef

cluster-rebuild:  ## in the cluster: empty the read model and the cache, replay the outbox history
	$(require_kubectl)
	$(call run_ops_job,todo-cqrs-rebuild-read-model)

cluster-dead-letters:  ## in the cluster: list the dead letters in S3
	$(require_kubectl)
	$(call run_ops_job,todo-cqrs-dead-letters-list)

# As the KafkaSource (its OIDC account); with authentication-oidc off, as the Jobs' account with no token.
resend_ops = $(shell if $(oidc_enabled); then echo $(OPS_DIR); else echo $(OPS_WITHOUT_IDENTITY_DIR); \
  echo "authentication-oidc is off: the KafkaSource has no identity, so the letters go without a token" >&2; fi)

cluster-resend:  ## in the cluster: re-send the dead letters to project-event
	$(require_kubectl)
	$(call render,$(OPS_WITHOUT_IDENTITY_DIR),knative/ops/without-sender-identity)
	$(call run_ops_job,todo-cqrs-dead-letters-resend,$(resend_ops))
