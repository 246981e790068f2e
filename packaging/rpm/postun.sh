# mqic .rpm %postun (%systemd_postun_with_restart): reload units; on upgrade ($1 >= 1)
# restart a running mqic (steps survive: KillMode=process). Erase keeps /var/lib/mqic and
# the mqic user, as rpm packages do.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mqic.service >/dev/null 2>&1 || :
    fi
fi
exit 0
