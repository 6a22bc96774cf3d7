#!/usr/bin/env bash
# TorchServe's documented quick start (docs/getting_started.md), command for command, with the
# text classifier of examples/text_classification in place of densenet161 (no download, no
# torchvision). Run it where model.py, model.pt, source_vocab.pt, index_to_name.json and the
# sample texts are; a config.properties there may move the ports (TorchServe reads it from the
# working directory too), and INFERENCE / MANAGEMENT then say where they went.
set -euo pipefail
INFERENCE=${INFERENCE:-http://127.0.0.1:8080}
MANAGEMENT=${MANAGEMENT:-http://127.0.0.1:8081}
trap 'torchserve --stop > /dev/null' ERR   # never leave a server behind a failed step

mkdir model_store
torch-model-archiver --model-name my_text_classifier --version 1.0 --model-file model.py --serialized-file model.pt --handler text_classifier --extra-files "index_to_name.json,source_vocab.pt" --export-path model_store
torchserve --start --disable-token-auth --no-config-snapshots --model-store model_store --models my_tc=my_text_classifier.mar
curl "$INFERENCE/predictions/my_tc" -T sample_text.txt
curl "$INFERENCE/predictions/my_tc" -T sample_text_bad.txt
curl "$MANAGEMENT/models"
torchserve --stop
