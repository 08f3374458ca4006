#!/bin/sh
# The edge's configuration with the ws service's name in it (WS_SERVICE, default ws), then nginx.
set -e
service=${WS_SERVICE:-ws}
case "$service" in
  *[!A-Za-z0-9_.-]*|'') echo "edge: WS_SERVICE=$service is not a service name" >&2; exit 1 ;;
esac
sed "s/@WS_SERVICE@/$service/g" /etc/nginx/nginx.conf.in > /tmp/nginx.conf
exec nginx -c /tmp/nginx.conf -g 'daemon off;'
