"""The Pod Security Standards "restricted" profile as a checker: every rule of the baseline and restricted
levels (https://kubernetes.io/docs/concepts/security/pod-security-standards/, policy version v1.31), applied
to a pod spec the way the PodSecurity admission controller does (pod-level fields count for every container
where the standard says so). `violations(spec)` is empty when a namespace labelled
`pod-security.kubernetes.io/enforce: restricted` would admit the pod.
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def violations(spec: dict[str, Any]) -> list[str]:
    """Every "restricted" rule the pod spec breaks, one line each (empty: admitted)."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    cs = containers(spec)

    # --- baseline -----------------------------------------------------------------------------------------
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: hostProcess")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"pod: {field}")
    for vol in spec.get("volumes", []):
        if "hostPath" in vol:
            out.append(f"volume {vol.get('name')}: hostPath")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"pod: unsafe sysctl {sysctl['name']}")
    _check_selinux("pod", psc, out)
    _check_apparmor("pod", psc, out)
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("pod: seccompProfile Unconfined")
    for c in cs:
        name = f"container {c.get('name')}"
        sc = c.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"{name}: adds capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        _check_selinux(name, sc, out)
        _check_apparmor(name, sc, out)
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")

    # --- restricted ---------------------------------------------------------------------------------------
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol.get('name')}: type {sorted(kinds - RESTRICTED_VOLUMES)} not allowed")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"pod: seccompProfile {pod_seccomp}")
    for c in cs:
        name = f"container {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            out.append(f"{name}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp}")
        if seccomp is None and pod_seccomp is None:
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost (pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: may add only NET_BIND_SERVICE")
    return out


def _check_selinux(where: str, sc: dict[str, Any], out: list[str]) -> None:
    opts = sc.get("seLinuxOptions") or {}
    if opts.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}: seLinuxOptions.type {opts['type']}")
    for field in ("user", "role"):
        if opts.get(field):
            out.append(f"{where}: seLinuxOptions.{field} set")


def _check_apparmor(where: str, sc: dict[str, Any], out: list[str]) -> None:
    kind = (sc.get("appArmorProfile") or {}).get("type")
    if kind is not None and kind not in ("RuntimeDefault", "Localhost"):
        out.append(f"{where}: appArmorProfile {kind}")
