#!/usr/bin/env bash
# Runs a config on every host of a Cloud TPU VM pod slice (jax finds its peers itself).
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/cifar10_nda_gan.py --workdir=gs://bucket/run
# Every host needs the repository in ~/nda_jax and the data at the same local data_dir;
# the workdir must be shared by all hosts (a GCS bucket: the gcs extra is installed).
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; cd ~/nda_jax && pip install -q -e '.[gcs]' 'jax[tpu]' &&
  NDA_DISTRIBUTED=auto python -m nda_jax.main${args}"
