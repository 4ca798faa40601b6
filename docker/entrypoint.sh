#!/bin/sh
# Container start for docker-compose.yml: shape this container's link, then run tpi with the
# service's command. LINK_DELAY (one way, e.g. 5ms) and LINK_RATE (e.g. 300mbit) become a netem
# qdisc on the egress of LINK_DEV (eth0): every packet this container sends waits LINK_DELAY and
# leaves at LINK_RATE, so between two containers the round trip is twice LINK_DELAY. Needs
# cap_add NET_ADMIN and the host kernel's sch_netem (ordinary Docker hosts have both).
set -eu
dev="${LINK_DEV:-eth0}"
delay="${LINK_DELAY:-}"
rate="${LINK_RATE:-}"
if [ -n "$delay$rate" ]; then
    # shellcheck disable=SC2086  # the optional words are meant to split
    if ! tc qdisc replace dev "$dev" root netem ${delay:+delay "$delay"} ${rate:+rate "$rate"}; then
        echo "entrypoint: cannot shape $dev with netem (delay '$delay', rate '$rate'): the container needs" \
             "cap_add NET_ADMIN and the host kernel sch_netem; unset LINK_DELAY and LINK_RATE to run unshaped" >&2
        exit 1
    fi
    echo "entrypoint: $dev shaped: $(tc qdisc show dev "$dev" root)" >&2
fi
exec tpi "$@"
