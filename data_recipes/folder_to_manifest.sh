#!/usr/bin/env bash
# Build a manifest for a folder of videos/images with the filters the CogVideoX recipes assume, then print its
# summary. Usage:
#   data_recipes/folder_to_manifest.sh FOLDER [CAPTIONS.csv|CAPTIONS.jsonl]
# Environment overrides: OUT (default FOLDER/manifest.jsonl), WORKERS (default: all cores), MIN_DURATION (s, 2),
# MIN_RESOLUTION (short side px, 256), MAX_ASPECT (long/short, 2.5), CHECK (full|fast, full).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 FOLDER [CAPTIONS.csv|CAPTIONS.jsonl]" >&2
  exit 2
fi
folder="$1"
out="${OUT:-$folder/manifest.jsonl}"
args=(manifest "$folder" --out "$out"
      --min-duration "${MIN_DURATION:-2}"
      --min-resolution "${MIN_RESOLUTION:-256}"
      --max-aspect-ratio "${MAX_ASPECT:-2.5}"
      --check "${CHECK:-full}")
if [[ -n "${WORKERS:-}" ]]; then
  args+=(--workers "$WORKERS")
fi
if [[ $# -eq 2 ]]; then
  args+=(--captions "$2")
fi
cogvx-data "${args[@]}"
echo
echo "train with: data.manifest=$out   (re-print the summary with: cogvx-data summary $out)"
