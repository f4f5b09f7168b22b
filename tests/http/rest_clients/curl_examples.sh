#!/usr/bin/env bash
# The curl commands of the FastAPI REST service's README, as its users type them (port 8000).
# Usage: curl_examples.sh FILE.wav
set -euo pipefail
curl -s http://localhost:8000/
echo
curl -s http://localhost:8000/info
echo
curl -s -X POST "http://localhost:8000/detect" -F "audio_file=@$1"
echo
curl -s -X POST "http://localhost:8000/detect" -F "audio_file=@$1" -F "threshold=0.3"
echo
curl -s -o /dev/null -w '%{http_code} %{content_type}\n' http://localhost:8000/docs
curl -s http://localhost:8000/metrics | grep -c '^# TYPE'
