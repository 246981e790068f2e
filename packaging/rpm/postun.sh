# mqic .rpm %postun (%systemd_postun_with_restart): reload units; on upgrade ($1 >= 1)
# restart a running mqic (steps survive: KillMode=process). Erase keeps /var/lib/mqic and
# the mqic user, as rpm packages do.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mqic.service >/dev/null 2>&1 || :
    fi
fi
# The package does not own /etc/mqic; an empty one goes with it (a kept .rpmsave stays).
if [ "$1" -eq 0 ]; then
    rmdir /etc/mqic 2>/dev/null || :
fi
exit 0
