# mqic .rpm %post (what %systemd_post does, which cargo-generate-rpm does not add).
# $1 = 1 on install, 2 on upgrade.
[ -d /var/lib/mqic ] || install -d -o mqic -g mqic -m 0750 /var/lib/mqic
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        # Enabled only where the distribution's preset says so (usually not).
        systemctl --no-reload preset mqic.service >/dev/null 2>&1 || :
    fi
fi
if [ "$1" -eq 1 ]; then
    echo "mqic: edit /etc/mqic/mqic.toml (check it with: mqic config check /etc/mqic/mqic.toml),"
    echo "mqic: then start it with: systemctl enable --now mqic"
fi
exit 0
