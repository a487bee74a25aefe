"""A single-node Apache Kafka broker (KRaft) run from jars that Maven fetches from Maven Central."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts.topics import TOPICS
from deploy.local.console import say
from deploy.local.errors import InfraError, JarsDownloadFailed, JavaMissing, MavenMissing, StartFailed
from deploy.local.interrupts import DeferredSignals
from deploy.local.processes import (
    MAX_LOG_BYTES,
    ensure_port_free,
    find_process,
    log_sizes,
    log_tails,
    open_log,
    pid_alive,
    port_open,
    read_pid,
    run_async,
    runs_exactly,
    terminate,
    text_tail,
)
from deploy.local.settings import LocalInfraSettings, StateLayout
from deploy.local.status import ComponentStatus

MIN_JAVA = 17
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
MAIN_CLASS = "kafka.Kafka"
VERSION_STAMP = ".kafka-version"
TOPIC_ALREADY_EXISTS = 36
UNKNOWN_TOPIC_OR_PARTITION = 3  # deleted meanwhile
MAX_MESSAGE_BYTES = 10 * 1024 * 1024


def _log4j_value(text: str) -> str:
    """A path as a log4j2 properties value: backslashes escaped for the properties reader, ``${`` for
    log4j's lookups."""
    return text.replace("\\", "\\\\").replace("${", "$${")


def _broker_log4j(layout: StateLayout) -> str:
    """The broker's log4j2 configuration: everything into logs/kafka.log, which log4j itself moves to
    kafka.log.1 (replacing the one before) once it passes MAX_LOG_BYTES.

    The broker runs for months without starting again, and its output used to go to the console, into a file
    only a restart rotated. Log4j rolls its own file while it runs, as Kafka's operators expect of its
    server.log; nothing goes to the console any more, where the JVM's own messages (one that cannot start,
    an OutOfMemoryError ending it) still go (kafka.out, see KafkaBroker.start)."""
    log = str(layout.kafka_log)
    return f"""\
status = error
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {_log4j_value(log)}
appender.file.filePattern = {_log4j_value(log.replace("%", "%%"))}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = {MAX_LOG_BYTES}
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 1
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


# Kafka's tools log INFO to stdout by default, which would mix with their output.
TOOLS_LOG4J = """\
status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
"""


def _server_properties(settings: LocalInfraSettings, layout: StateLayout) -> str:
    port, controller = settings.kafka_port, settings.kafka_controller_port
    return f"""\
# Written by driftloop (deploy/local/broker.py) before every start: edits here are overwritten.
process.roles=broker,controller
node.id=1
controller.listener.names=CONTROLLER
controller.quorum.voters=1@127.0.0.1:{controller}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={layout.kafka_data}
# One broker: every internal topic must have replication factor 1, or groups and transactions hang.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=3
# Topics come from contracts/topics.py through the Admin API, never from a typo in a producer.
auto.create.topics.enable=false
# Tests and local runs should not wait for late joiners before the first rebalance.
group.initial.rebalance.delay.ms=0
message.max.bytes={MAX_MESSAGE_BYTES}
replica.fetch.max.bytes={MAX_MESSAGE_BYTES}
log.retention.hours=168
"""


def _new_cluster_id() -> str:
    # Kafka's Uuid.randomUuid(): 16 random bytes, url-safe base64 without padding, never starting with '-'.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def java_executable() -> str:
    """The java binary to use: $JAVA_HOME/bin/java when set, else java on PATH; checks the version."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    install = "install a Java 17+ runtime, e.g. `apt-get install -y openjdk-17-jre-headless`"
    if not java or not Path(java).exists():
        raise JavaMissing("Java is not installed (no `java` on PATH or in $JAVA_HOME).", hint=install + ".")
    try:
        probe = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise JavaMissing(f"`{java} -version` failed: {err}.", hint=install + ".") from err
    match = re.search(r'version "(\d+)(?:\.(\d+))?', probe.stderr + probe.stdout)
    if not match:
        raise JavaMissing(f"could not read the Java version from `{java} -version`.", hint=install + ".")
    major = int(match.group(1))
    if major == 1 and match.group(2):
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise JavaMissing(
            f"Kafka needs Java {MIN_JAVA} or newer; {java} is Java {major}.",
            hint=f"{install}, or point JAVA_HOME at one.",
        )
    return java


async def _broker_count(bootstrap: str, timeout_s: float) -> int:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="driftloop-infra", request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return len(cluster["brokers"])
    finally:
        await admin.close()


def broker_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when a Kafka metadata request to the bootstrap servers gets an answer naming a broker."""
    try:
        return run_async(lambda: _broker_count(bootstrap, timeout_s)) > 0
    except Exception:
        # Any failure here means "not ready yet"; the caller owns the deadline and reports the log.
        return False


async def _create_topics(bootstrap: str, replication_factor: int, prefix: str = "") -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="driftloop-infra")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                prefix + spec.name,
                spec.partitions,
                replication_factor,
                topic_configs={"retention.ms": str(spec.retention_ms)},
            )
            for spec in TOPICS.values()
            if prefix + spec.name not in existing
        ]
        if not missing:
            return []
        response = await admin.create_topics(missing)
        failures = [
            f"{topic}: {message or code}"
            for topic, code, message in response.topic_errors
            if code not in (0, TOPIC_ALREADY_EXISTS)
        ]
        if failures:
            raise InfraError(
                "Kafka refused to create topics: " + "; ".join(failures),
                hint="check the broker log and that the replication factor fits the number of brokers.",
            )
        return [topic.name for topic in missing]
    finally:
        await admin.close()


def create_platform_topics(bootstrap: str, replication_factor: int = 1, *, prefix: str = "") -> list[str]:
    """Create every topic of contracts.topics that is missing (idempotent); returns the ones created.

    ``prefix`` is the platform's topic prefix (DRIFTLOOP_KAFKA_TOPIC_PREFIX), for isolated namespaces."""
    return run_async(lambda: _create_topics(bootstrap, replication_factor, prefix))


async def _delete_topics(bootstrap: str, where: Callable[[str], bool]) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="driftloop-infra")
    await admin.start()
    try:
        ours = sorted(
            t for t in await admin.list_topics() if where(t) and t not in TOPICS and not t.startswith("__")
        )
        if ours:
            response = await admin.delete_topics(ours)
            failures = [
                f"{topic}: {code}"
                for topic, code in response.topic_error_codes
                if code not in (0, UNKNOWN_TOPIC_OR_PARTITION)
            ]
            if failures:
                raise InfraError(
                    "Kafka refused to delete topics: " + "; ".join(failures),
                    hint="check the broker log; delete them with kafka-topics.sh --delete.",
                )
        return ours
    finally:
        await admin.close()


def delete_topics(bootstrap: str, where: Callable[[str], bool]) -> list[str]:
    """Delete every topic whose name ``where`` accepts, except the platform's own (unprefixed) topics and
    Kafka's internal ones; returns their names. For what tests and benchmarks made, named so they can tell."""
    return run_async(lambda: _delete_topics(bootstrap, where))


def delete_platform_topics(bootstrap: str, *, prefix: str) -> list[str]:
    """Delete every topic under ``prefix`` (an isolated namespace's, never the platform's own); returns
    their names. What a sandbox or a benchmark leaves when it is done: a benchmark that wrote into the
    platform's own topics left gigabytes in a developer's broker for a week's retention."""
    if not prefix:
        raise ValueError("a prefix is required: the unprefixed topics are the platform's own")
    return delete_topics(bootstrap, lambda topic: topic.startswith(prefix))


def unreadable_jars(folder: Path) -> list[str]:
    """The names of the jars in ``folder`` that are not readable zip files (truncated, an HTML page)."""
    broken = []
    for jar in sorted(folder.glob("*.jar")):
        try:
            with zipfile.ZipFile(jar):
                pass
        except (zipfile.BadZipFile, OSError):
            broken.append(jar.name)
    return broken


class KafkaBroker:
    """The project's own broker: jars in .driftloop/kafka/libs, data, config and pid beside them."""

    name = "kafka"

    def __init__(self, settings: LocalInfraSettings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers clients should use."""
        return f"127.0.0.1:{self.settings.kafka_port}"

    @property
    def _signature(self) -> tuple[str, str]:
        # What only our broker's java has on its command line: the main class, then our config, exactly.
        return (MAIN_CLASS, str(self.layout.kafka_config))

    def running_pid(self) -> int | None:
        """The pid of our broker if it runs (from the pid file, else found in /proc by its config path)."""
        pid = read_pid(self.layout.kafka_pid)
        if pid is not None and pid_alive(pid) and runs_exactly(pid, self._signature, program="java"):
            return pid
        return find_process(self._signature, program="java")

    def jars_present(self) -> bool:
        """True when the jars of the configured Kafka version are already downloaded."""
        stamp = self.layout.kafka_libs / VERSION_STAMP
        return stamp.exists() and stamp.read_text().strip() == self.settings.kafka_version

    def preflight(self) -> None:
        """Check, before anything starts, that Java, Maven (if needed) and both ports are usable."""
        if self.running_pid() is not None:
            return
        ensure_port_free(self.settings.kafka_port, "Kafka", "DRIFTLOOP_LOCAL_KAFKA_PORT")
        ensure_port_free(
            self.settings.kafka_controller_port, "Kafka controller", "DRIFTLOOP_LOCAL_KAFKA_CONTROLLER_PORT"
        )
        java_executable()
        if not self.jars_present() and shutil.which("mvn") is None:
            raise MavenMissing(
                "Maven is needed once to fetch the Kafka jars from Maven Central, and `mvn` is not on PATH.",
                hint="install it, e.g. `apt-get install -y maven`, then run the command again.",
            )

    def ensure_jars(self) -> None:
        """Fetch the broker's runtime jars with Maven unless the right version is already there."""
        if self.jars_present():
            return
        version = self.settings.kafka_version
        say(f"downloading Kafka {version} jars from Maven Central (first run only) ...")
        staging = self.layout.kafka / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        started = time.monotonic()
        # --strict-checksums: a download that does not match Maven Central's checksum (a proxy's error page
        # served as the jar) fails here; by default Maven keeps it with a warning, which -q hides.
        command = [
            "mvn", "-q", "-B", "--strict-checksums", "-f", str(POM), f"-Dkafka.version={version}",
            "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            output = text_tail(result.stdout + result.stderr)
            raise JarsDownloadFailed(
                f"Maven could not fetch Kafka {version} (exit code {result.returncode}):\n{output}",
                hint="check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml) "
                "and that the version exists.",
            )
        if broken := unreadable_jars(staging):
            # Maven never checks its own repository again: what a download left damaged there before
            # (without --strict-checksums, or by hand) is copied as it is, and would be stamped as good.
            raise JarsDownloadFailed(
                f"Maven fetched Kafka {version}, but {len(broken)} of the jars are not readable jar files "
                f"(damaged in your Maven repository): {', '.join(broken)}",
                hint="delete them from the Maven repository (~/.m2/repository unless settings.xml names "
                f"another), e.g. `find ~/.m2/repository -name {broken[0]} -delete`, and run the command "
                "again.",
            )
        (staging / VERSION_STAMP).write_text(version + "\n")
        shutil.rmtree(self.layout.kafka_libs, ignore_errors=True)
        staging.rename(self.layout.kafka_libs)
        count = len(list(self.layout.kafka_libs.glob("*.jar")))
        say(f"fetched {count} jars in {time.monotonic() - started:.0f}s into {self.layout.kafka_libs}")

    def _classpath(self) -> str:
        # Quoted wildcard: the JVM expands it, so the command line stays short.
        return f"{self.layout.kafka_libs}/*"

    def _write_config(self) -> None:
        self.layout.kafka.mkdir(parents=True, exist_ok=True)
        self.layout.kafka_config.write_text(_server_properties(self.settings, self.layout))
        (self.layout.kafka / "log4j2.properties").write_text(_broker_log4j(self.layout))
        (self.layout.kafka / "tools-log4j2.properties").write_text(TOOLS_LOG4J)

    def _format_storage(self, java: str) -> None:
        if (self.layout.kafka_data / "meta.properties").exists():
            return
        say(f"formatting Kafka storage in {self.layout.kafka_data} ...")
        command = [
            java, f"-Dlog4j2.configurationFile={self.layout.kafka / 'tools-log4j2.properties'}",
            "-cp", self._classpath(), "kafka.tools.StorageTool", "format",
            "-t", _new_cluster_id(), "-c", str(self.layout.kafka_config),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StartFailed(
                f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}",
                hint=f"delete {self.layout.kafka_data} and try again.",
            )

    def start(self) -> bool:
        """Start the broker unless it already runs, and wait until it answers; True if started now."""
        if (running := self.running_pid()) is not None:
            self._wait_running(running)
            return False
        self.preflight()
        self.ensure_jars()
        java = java_executable()
        self._write_config()
        self._format_storage(java)
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        say(f"starting Kafka {self.settings.kafka_version} on {self.bootstrap} ...")
        started = time.monotonic()
        command = [
            java, f"-Xmx{self.settings.kafka_heap}", "-Xms256m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.layout.kafka / 'log4j2.properties'}",
            "-cp", self._classpath(), MAIN_CLASS, str(self.layout.kafka_config),
        ]  # fmt: skip
        # log4j writes kafka.log; the console, what the JVM says outside log4j (a start that fails before
        # log4j is set up, an OutOfMemoryError ending it), goes to kafka.out, rotated at each start.
        with open_log(self.layout.kafka_console_log) as console:
            since = log_sizes(self._logs)
            # Own session: the broker outlives this command and ignores the terminal's Ctrl-C.
            process = subprocess.Popen(
                command,
                cwd=self.layout.kafka,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.layout.kafka_pid.write_text(f"{process.pid}\n")
            self._wait_ready(process.pid, since)
        except BaseException:
            # Launched is started: a failure or Ctrl-C while it comes up must not leave it running.
            with DeferredSignals("stopping the Kafka broker that was starting"):
                terminate(process.pid, timeout_s=20)
                self.layout.kafka_pid.unlink(missing_ok=True)
            raise
        say(f"Kafka is ready on {self.bootstrap} (pid {process.pid}, {time.monotonic() - started:.1f}s)")
        return True

    def _wait_running(self, pid: int) -> None:
        """Wait until a broker that already runs answers: one whose start was cut short by SIGKILL (the
        command that launched it gone, the broker still coming up) or that hangs. The topics are made on it
        next, and aiokafka's bare KafkaConnectionError would be all the user saw, as a traceback."""
        if port_open(self.settings.kafka_port) and broker_answers(self.bootstrap):
            return
        say(f"Kafka (pid {pid}) runs but does not answer yet; waiting for it ...")
        self._wait_ready(pid, since={}, launched=False)

    @property
    def _logs(self) -> tuple[Path, Path]:
        return (self.layout.kafka_log, self.layout.kafka_console_log)

    def _wait_ready(self, pid: int, since: dict[Path, int], *, launched: bool = True) -> None:
        """Wait until the broker answers; ``since`` holds the logs' sizes before its start, so that a
        failure shows what this start logged."""
        timeout = self.settings.ready_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            if not pid_alive(pid):
                self.layout.kafka_pid.unlink(missing_ok=True)
                raise StartFailed(
                    "the Kafka broker exited while starting. " + log_tails(self._logs, since),
                    hint="fix the cause shown above and run the command again.",
                )
            # The client port opens only once the broker is unfenced; the metadata answer confirms it.
            if port_open(self.settings.kafka_port) and broker_answers(self.bootstrap):
                return
            if time.monotonic() >= deadline and launched:
                # start() stops it on the way out, as on any failure while it comes up.
                raise StartFailed(
                    f"Kafka did not become ready within {timeout:.0f}s and was stopped. "
                    + log_tails(self._logs, since),
                    hint="on a busy machine raise DRIFTLOOP_LOCAL_READY_TIMEOUT_S; otherwise see the log.",
                )
            if time.monotonic() >= deadline:
                # Not this command's to stop: it did not start it, and another command may be using it.
                raise StartFailed(
                    f"Kafka (pid {pid}) runs but did not answer within {timeout:.0f}s; it was left running. "
                    + log_tails(self._logs, since),
                    hint="see the log; `driftloop infra down` stops it, then run the command again.",
                )
            time.sleep(0.25)

    def stop(self) -> bool:
        """Stop our broker (SIGTERM, SIGKILL after 30 s); True if one was running."""
        pid = self.running_pid()
        if pid is None:
            self.layout.kafka_pid.unlink(missing_ok=True)
            return False
        say(f"stopping Kafka (pid {pid}) ...")
        if terminate(pid, timeout_s=30):
            say("Kafka did not stop within 30s after SIGTERM and was killed")
        self.layout.kafka_pid.unlink(missing_ok=True)
        return True

    def status(self) -> ComponentStatus:
        """Running or not, answering or not, and where."""
        pid = self.running_pid()
        if pid is None:
            return ComponentStatus(self.name, "stopped", False, self.bootstrap)
        ready = port_open(self.settings.kafka_port) and broker_answers(self.bootstrap)
        version = f"Kafka {self.settings.kafka_version}"
        state = "ready" if ready else "not ready"
        return ComponentStatus(self.name, state, ready, self.bootstrap, pid, version)


class ExternalKafka:
    """A broker the user pointed us at with DRIFTLOOP_KAFKA_BOOTSTRAP: used, never started or stopped."""

    name = "kafka"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def status(self) -> ComponentStatus:
        """Whether the external broker answers a metadata request."""
        ready = broker_answers(self.bootstrap)
        state = "ready" if ready else "unreachable"
        detail = "external (DRIFTLOOP_KAFKA_BOOTSTRAP)"
        return ComponentStatus(self.name, state, ready, self.bootstrap, None, detail)
