"""The FastAPI REST service's Python client, as its users run it: `python requests_client.py FILE.wav`."""

import sys

import requests

API_URL = "http://localhost:8000"


def check_service():
    response = requests.get(f"{API_URL}/", timeout=10)
    data = response.json()
    print(f"service: {data['service']} status: {data['status']} model loaded: {data['model_loaded']}")
    return data["model_loaded"]


def model_info():
    info = requests.get(f"{API_URL}/info", timeout=10).json()
    print(f"model: {info['model_id']} keywords: {', '.join(info['keywords'])}")
    print(f"input: {info['input_format']} threshold range: {info['threshold_range']}")


def detect(path, threshold=0.5):
    with open(path, "rb") as f:
        files = {"audio_file": (path.rsplit("/", 1)[-1], f, "audio/wav")}
        response = requests.post(f"{API_URL}/detect", files=files, data={"threshold": threshold}, timeout=60)
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.json()['detail']}")
        return None
    result = response.json()
    if result["success"] and result["detected"]:
        print(f"keyword: {result['keyword']} confidence: {result['confidence']:.3f}")
    else:
        print(f"{result.get('message', 'no keyword')} (confidence {result['confidence']:.3f})")
    print(f"processing time: {result['processing_time_ms']} ms at {result['timestamp']}")
    return result


if __name__ == "__main__":
    if check_service():
        model_info()
        detect(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
