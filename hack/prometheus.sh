#!/usr/bin/env bash
# A real Prometheus on 127.0.0.1 for tests and local demos (Debian's `prometheus` package, which ships
# promtool too). Used by tests/chart/test_prometheus.py.
#
#   hack/prometheus.sh install
#       apt-get install prometheus when /usr/bin/prometheus is missing (add `prometheus` to
#       hack/apt-packages.txt so hack/setup.sh installs it up front).
#   hack/prometheus.sh run DIR PORT [TARGET...]
#       write DIR/prometheus.yml scraping each TARGET every second and loading the rule files
#       DIR/rules/*.yml, then exec prometheus on 127.0.0.1:PORT with its TSDB in DIR/data (the PID you
#       started is Prometheus itself: stop it with SIGTERM). TARGET is JOB=HOST:PORT[,LABEL=VALUE...];
#       the extra labels are target labels (e.g. pod=... as Prometheus Operator would add).
#       honor_labels is on, as in the chart's PodMonitor: the trainer's own `job` (FineTuneJob name)
#       and `namespace` labels win over the scrape job's.
set -euo pipefail

PROMETHEUS=${PROMETHEUS:-/usr/bin/prometheus}

install() {
  if [[ -x $PROMETHEUS ]]; then return 0; fi
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  # The package's postinst does not start a daemon without systemd; we run our own below.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

run() {
  local dir=$1 port=$2
  shift 2
  mkdir -p "$dir/rules" "$dir/data"
  {
    printf 'global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n'
    printf 'rule_files:\n  - %s/rules/*.yml\n' "$dir"
    printf 'scrape_configs:\n'
    local target job addr labels kv
    for target in "$@"; do
      job=${target%%=*}
      addr=${target#*=}
      labels=""
      if [[ $addr == *,* ]]; then
        labels=${addr#*,}
        addr=${addr%%,*}
      fi
      [[ $addr == 127.0.0.1:* ]] || { echo "prometheus.sh: only 127.0.0.1 targets: $addr" >&2; exit 2; }
      printf '  - job_name: %s\n    honor_labels: true\n    static_configs:\n      - targets: ["%s"]\n' \
        "$job" "$addr"
      if [[ -n $labels ]]; then
        printf '        labels:\n'
        IFS=, read -ra kvs <<<"$labels"
        for kv in "${kvs[@]}"; do printf '          %s: "%s"\n' "${kv%%=*}" "${kv#*=}"; done
      fi
    done
  } >"$dir/prometheus.yml"
  exec "$PROMETHEUS" \
    --config.file="$dir/prometheus.yml" \
    --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$port" \
    --web.enable-lifecycle \
    --log.level=warn
}

case ${1:-} in
  install) install ;;
  run)
    [[ $# -ge 3 ]] || { echo "usage: $0 run DIR PORT [JOB=127.0.0.1:PORT[,LABEL=VALUE...]]..." >&2; exit 2; }
    install
    shift
    run "$@"
    ;;
  *) echo "usage: $0 install | run DIR PORT [TARGET...]" >&2; exit 2 ;;
esac
