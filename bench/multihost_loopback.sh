#!/bin/bash
# The README's multi-host commands, every "host" on loopback (LINK=127.0.0.1).
set -e
cd "$(dirname "$0")/.."; . .venv/bin/activate
LINK=127.0.0.1
export FEDFINN_DATA=${FEDFINN_DATA:-$PWD/../shared/data}
W=${W:-/tmp/fedfinn-multihost}; rm -rf $W; mkdir -p $W
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# host L: certificates
python -m training.certs --out $W/certs --nodes 2 --host $LINK
# host L: SuperLink
FLWR_HOME=$W/link flower-superlink --host $LINK --port 39093 --disable-runtime-dependency-installation \
  --ssl-ca-certfile $W/certs/ca.crt --ssl-certfile $W/certs/server.crt --ssl-keyfile $W/certs/server.key \
  --enable-supernode-auth > $W/link.log 2>&1 &
LPID=$!
sleep 8
mkdir -p $W/link
cat > $W/link/config.toml <<EOT
[superlink]
default = "fedfinn"

[superlink.fedfinn]
address = "$LINK:39093"
root-certificates = "$W/certs/ca.crt"
EOT
for i in 0 1; do FLWR_HOME=$W/link flwr supernode register $W/certs/node_$i.pub fedfinn; done
# hosts N0, N1: SuperNodes
for i in 0 1; do
  FLWR_HOME=$W/node$i fedfinn supernode --superlink $LINK:39093 --root-certificates $W/certs/ca.crt \
    --auth-supernode-private-key $W/certs/node_$i.key --node-config "partition-id=$i num-partitions=2" \
    --host 127.0.0.1 --port $((39100+i)) > $W/node$i.log 2>&1 &
  echo $! >> $W/nodes.pid
done
sleep 5
# host L: the run
cat > $W/run_config.toml <<EOT
config = "$PWD/configs/quick.toml"
overrides = "federation.num_clients=2;federation.rounds=2;data.images_per_client=200;data.test_images=500;run.name=\"multihost\";run.out_dir=\"$W/runs\""
EOT
FLWR_HOME=$W/link timeout 600 flwr run . fedfinn --stream --run-config $W/run_config.toml > $W/serverapp.log 2>&1 || echo "flwr run rc $?"
cat $W/runs/multihost/metrics.jsonl | cut -c1-150
kill $(cat $W/nodes.pid) $LPID; sleep 2; pkill -f "$W" || true
