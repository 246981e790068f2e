# mqic .rpm %pre: the mqic system user, before the files (the config's group is mqic).
getent group mqic >/dev/null || groupadd --system mqic
getent passwd mqic >/dev/null || useradd --system --gid mqic --home-dir /var/lib/mqic \
    --no-create-home --shell /sbin/nologin --comment "MQI Communicator" mqic
exit 0
