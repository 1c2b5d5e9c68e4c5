#!/bin/sh
# Make the deployment's secrets, once: nothing in deploy/ ships a default.
#
#   sh deploy/make-secrets.sh          # both of the below
#   sh deploy/make-secrets.sh compose  # .env beside docker-compose.yml: REDIS_PASSWORD,
#                                      #   GRAFANA_ADMIN_PASSWORD, WEIGHTS_ANNOUNCE_SECRET
#   sh deploy/make-secrets.sh k8s      # deploy/k8s/base/secrets/redis.env: the Redis password,
#                                      #   deploy/k8s/base/secrets/weights.env: the announce key
#
# A value that is already set is kept (run it again safely). Values are 48 hex characters:
# URL-safe, since the Redis password goes into the bus URL. WEIGHTS_ANNOUNCE_SECRET (announce_secret
# for Kubernetes) is the key the trainer signs weight announcements with and the replicas check
# them by (weights.announce_secret). All files are ignored by git and readable by their owner only.
set -eu
cd "$(dirname "$0")/.."
umask 077

random_hex() {
  if command -v openssl >/dev/null 2>&1; then
    openssl rand -hex 24
  else
    od -An -tx1 -N24 /dev/urandom | tr -d ' \n'
    echo
  fi
}

# KEY=<random> appended to FILE unless FILE already sets KEY.
ensure() {
  file=$1
  key=$2
  if [ -f "$file" ] && grep -q "^$key=" "$file"; then
    echo "$file: $key already set, kept"
  else
    printf '%s=%s\n' "$key" "$(random_hex)" >>"$file"
    echo "$file: $key written"
  fi
}

what=${1:-all}
case $what in
  all | compose | k8s) ;;
  *)
    echo "usage: sh deploy/make-secrets.sh [compose|k8s]" >&2
    exit 2
    ;;
esac
if [ "$what" != k8s ]; then
  ensure .env REDIS_PASSWORD
  ensure .env GRAFANA_ADMIN_PASSWORD
  ensure .env WEIGHTS_ANNOUNCE_SECRET
fi
if [ "$what" != compose ]; then
  ensure deploy/k8s/base/secrets/redis.env password
  ensure deploy/k8s/base/secrets/weights.env announce_secret
fi
