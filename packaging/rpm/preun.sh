# mqic .rpm %preun (%systemd_preun): on erase ($1 = 0) stop and disable the service.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now mqic.service >/dev/null 2>&1 || :
fi
exit 0
