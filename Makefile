# Developer entry points. `make demo` runs the main job, `make test` the test suite.
# Both install what they need first (Debian packages via apt, a venv with the project).

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

# Debian packages bootlink uses at run time and in its tests. python3-libnbd exists only
# as a Debian package: the venv sees it through --system-site-packages.
APT_PACKAGES := python3 python3-venv python3-pip python3-libnbd python3-cryptography \
	python3-yaml python3-pyroute2 python3-psutil python3-pytest python3-hypothesis \
	python3-pycryptodome python3-pycdlib iproute2 nbdkit nbd-client libnbd-bin kmod \
	qemu-system-x86 qemu-utils ovmf mmdebstrap zstd cpio busybox-static kexec-tools \
	mtools dosfstools fdisk e2fsprogs ipfs-cid systemd-boot-efi binutils syslinux \
	syslinux-common isolinux xorriso systemd time gcc squashfs-tools

.PHONY: deps test test-qemu demo lint bench
deps: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(APT_PACKAGES) 2>/dev/null \
		| awk '$$NF != "installed" {print $$1}'; \
		for p in $(APT_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade 'cryptography>=42' 'hypothesis>=6' 'pytest>=7' ruff
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# The ramdisk runs Debian's own python3-cryptography (38), not the newer one the dev venv
# gets from PyPI: the crypto and wire tests also run against Debian's, in a second venv.
DEBVENV := .venv-debian
$(DEBVENV)/.installed: $(STAMP)
	/usr/bin/python3 -m venv --system-site-packages $(DEBVENV)
	$(DEBVENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test: deps $(DEBVENV)/.installed
	$(PY) -m pytest
	$(DEBVENV)/bin/python -m pytest -q tests/test_eax.py tests/test_wire.py

test-qemu: deps
	$(PY) -m pytest -m qemu; rc=$$?; [ $$rc -eq 5 ] && echo "no QEMU tests collected"; \
		[ $$rc -eq 0 ] || [ $$rc -eq 5 ]

demo: deps
	$(PY) -m bootlink demo --yes

lint: deps
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: deps
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
