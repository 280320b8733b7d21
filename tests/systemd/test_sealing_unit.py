"""The sealing key as an encrypted systemd credential, under systemd as PID 1.

The system unit loads `geins-broker.key` with LoadCredentialEncrypted= and a
SetCredential= default: without the credential the unit must start (sessions in clear);
with one made by the documented `systemd-creds encrypt` one-liner, sessions are sealed
with it; and a restart that loses it leaves the sealed file untouched and the profile
`sealed` (docs/security.md).
"""

from __future__ import annotations

from .deploy import UNIT, SystemService

STATE = "/var/lib/geins-broker/default.session.json"
CREDENTIAL = "/etc/credstore.encrypted/geins-broker.key"
# The one-liner of docs/security.md (no TPM2 in a container: `auto` takes the host key).
MAKE_CREDENTIAL = (
    "install -d -m 0700 /etc/credstore.encrypted && "
    "geins-broker key generate | systemd-creds encrypt --with-key=auto "
    f"--name=geins-broker.key - {CREDENTIAL}"
)


def test_the_key_credential_is_optional_and_seals_when_present(system: SystemService) -> None:
    machine = system.machine
    system.login()  # starts the service: no credential yet
    assert system.show("ActiveState")["ActiveState"] == "active"
    assert "event=sealing_off" in machine.journal(UNIT)
    assert machine.run(["head", "-c", "1", STATE]).stdout == "{"  # in clear, as before

    machine.run(MAKE_CREDENTIAL)
    machine.systemctl("restart", UNIT)
    system.wait_for_state("active", "running")
    journal = machine.journal(UNIT)
    assert "event=sealing_on" in journal and 'source="credential ' in journal
    system.cli("refresh")  # the next write seals the session that was in clear
    assert machine.run(["head", "-c", "6", STATE]).stdout == "GBSEAL"
    assert system.token()

    # The credential is lost: the unit still starts, the sealed file is kept as it is.
    before = machine.run(["sha256sum", STATE]).stdout
    machine.run(["rm", CREDENTIAL])
    machine.systemctl("restart", UNIT)
    system.wait_for_state("active", "running")
    status = system.cli("status", check=False).stdout
    assert "sealed" in status
    assert machine.run(["sha256sum", STATE]).stdout == before
