#!/bin/bash
set -e

ALB_DNS="nanogrid-alb-xxx.ap-northeast-2.elb.amazonaws.com"
BASE_URL="http://$ALB_DNS"

echo "=== NanoGrid E2E Test ==="

# 1. Health Check
echo "[1/5] Health Check..."
curl -s "$BASE_URL/health" | jq .

# 2. Upload Function
echo "[2/5] Uploading function..."
UPLOAD_RESULT=$(curl -s -X POST "$BASE_URL/upload" \
  -F "file=@hello.py" \
  -F "function_name=test-hello" \
  -F "runtime=python3.9" \
  -F "handler=hello.handler")
echo $UPLOAD_RESULT | jq .
FUNC_ID=$(echo $UPLOAD_RESULT | jq -r '.function_id')

# 3. Run Function (Sync)
echo "[3/5] Running function (sync)..."
curl -s -X POST "$BASE_URL/run" \
  -H "Content-Type: application/json" \
  -d "{\"function_id\": \"$FUNC_ID\", \"payload\": {\"name\": \"Test\"}}" | jq .

# 4. Run Function (Async)
echo "[4/5] Running function (async)..."
ASYNC_RESULT=$(curl -s -X POST "$BASE_URL/run" \
  -H "Content-Type: application/json" \
  -H "X-Async: true" \
  -d "{\"function_id\": \"$FUNC_ID\", \"payload\": {}}")
echo $ASYNC_RESULT | jq .
JOB_ID=$(echo $ASYNC_RESULT | jq -r '.job_id')

# 5. Check Status
echo "[5/5] Checking status..."
sleep 5
curl -s "$BASE_URL/status/$JOB_ID" | jq .

echo "=== Test Complete ==="
