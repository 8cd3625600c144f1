#!/usr/bin/env bash
# Usage: test_install.sh BUILD_DIR SOURCE_DIR CMAKE CC CUDA_BUILT(0|1)   (registered by tests/install.cmake)
# 1. the README's C block is tests/install/readme_snippet.c, byte for byte;
# 2. cmake --install BUILD_DIR --prefix TMP: headers, libkvq.a, libkvq.so.0 (soname), kvq.pc, the CMake package;
# 3. the snippet built with pkg-config (shared, then static) and with find_package(kvq) (kvq::kvq, kvq::kvq_static)
#    against TMP, and with add_subdirectory(SOURCE_DIR) (CUDA and model off: only the core library is compiled);
# 4. every binary runs (the snippet checks its attention output) and links libkvq the way it should: the shared
#    ones need libkvq.so.0 and load it from TMP, the static ones do not need it. Where CUDA was built: kvq_cuda.h
#    and libkvq_cuda.a are installed and a C program links kvq::kvq_cuda and calls it.
# No network: everything comes from SOURCE_DIR and BUILD_DIR. Exits 77 (skip) only if pkg-config is missing, after
# running the CMake parts.
set -euo pipefail
build=$(cd "$1" && pwd) src=$(cd "$2" && pwd) cmake=$3 cc=$4 cuda_built=$5
snippet=$src/tests/install/readme_snippet.c
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvq-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
step() { echo "== $*"; }
die() { echo "FAIL: $*" >&2; exit 1; }

step "README's C block is $snippet"
awk '/^```c$/ {on = 1; next} on && /^```$/ {exit} on' "$src/README.md" > "$tmp/readme.c"
diff -u "$snippet" "$tmp/readme.c" || die "README.md's first \`\`\`c block differs from tests/install/readme_snippet.c"

step "cmake --install $build --prefix $tmp/prefix"
"$cmake" --install "$build" --prefix "$tmp/prefix" > "$tmp/install.log" || { cat "$tmp/install.log"; die "install"; }
p=$tmp/prefix
libdir=$(dirname "$(find "$p" -name libkvq.a | head -n 1)")
[ -f "$libdir/libkvq.a" ] || die "no libkvq.a installed"
expect=(include/kvq.h "${libdir#$p/}/libkvq.so" "${libdir#$p/}/libkvq.so.0" "${libdir#$p/}/pkgconfig/kvq.pc"
        "${libdir#$p/}/cmake/kvq/kvqConfig.cmake" "${libdir#$p/}/cmake/kvq/kvqConfigVersion.cmake")
[ "$cuda_built" = 1 ] && expect+=(include/kvq_cuda.h "${libdir#$p/}/libkvq_cuda.a")
for f in "${expect[@]}"; do [ -e "$p/$f" ] || die "not installed: $f"; done
soname=$(readelf -d "$libdir/libkvq.so" | sed -n 's/.*SONAME.*\[\(.*\)\].*/\1/p')
[ "$soname" = libkvq.so.0 ] || die "libkvq.so has soname '$soname', expected libkvq.so.0"

# run_check BINARY shared|static: runs it and checks how it links libkvq
run_check() {
    local needed
    needed=$(readelf -d "$1" | grep -c 'NEEDED.*libkvq\.so' || true)
    if [ "$2" = shared ]; then
        [ "$needed" = 1 ] || die "$1 does not need libkvq.so.0"
        local deps
        deps=$(ldd "$1")  # not piped into grep -q: with pipefail, ldd's SIGPIPE would fail the check at random
        grep -qF "libkvq.so.0 => $3/libkvq.so.0" <<< "$deps" || { echo "$deps"; die "$1 does not load libkvq.so.0 from $3"; }
    else
        [ "$needed" = 0 ] || die "$1 (static) needs libkvq.so"
    fi
    "$1" || die "$1 failed"
}

skip=0
if command -v pkg-config > /dev/null; then
    export PKG_CONFIG_PATH=$libdir/pkgconfig
    step "pkg-config: $cc app.c \$(pkg-config --cflags --libs kvq) -lm"
    # shellcheck disable=SC2046
    "$cc" -std=c17 -Wall -Wextra -Werror -o "$tmp/pc_shared" "$snippet" $(pkg-config --cflags --libs kvq) -lm \
        -Wl,-rpath,"$libdir"
    run_check "$tmp/pc_shared" shared "$libdir"
    step "pkg-config, static: -l:libkvq.a in place of -lkvq, with --static (Libs.private)"
    # shellcheck disable=SC2046
    "$cc" -std=c17 -Wall -Wextra -Werror -o "$tmp/pc_static" "$snippet" $(pkg-config --cflags kvq) \
        $(pkg-config --static --libs kvq | sed 's/-lkvq\b/-l:libkvq.a/')
    run_check "$tmp/pc_static" static
else
    echo "SKIP pkg-config part: no pkg-config (apt-get install pkg-config)"
    skip=1
fi

# a generator that is there: Ninja if installed, else Unix Makefiles
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
step "find_package(kvq): CMAKE_PREFIX_PATH=$p"
"$cmake" -S "$src/tests/install/app" -B "$tmp/fp" "${gen[@]}" -DCMAKE_PREFIX_PATH="$p" -DCMAKE_C_COMPILER="$cc" \
    -DKVQ_SNIPPET="$snippet" -DKVQ_EXPECT_CUDA="$cuda_built" > "$tmp/fp.log" 2>&1 || { cat "$tmp/fp.log"; die "configure"; }
"$cmake" --build "$tmp/fp" -j2 > "$tmp/fp-build.log" 2>&1 || { cat "$tmp/fp-build.log"; die "build"; }
run_check "$tmp/fp/app_shared" shared "$libdir"
run_check "$tmp/fp/app_static" static
if [ "$cuda_built" = 1 ]; then
    "$tmp/fp/app_cuda" || die "app_cuda (kvq::kvq_cuda) failed"
fi

step "add_subdirectory($src), KVQ_CUDA=OFF KVQ_BUILD_MODEL=OFF"
"$cmake" -S "$src/tests/install/app" -B "$tmp/sub" "${gen[@]}" -DKVQ_SOURCE_DIR="$src" -DCMAKE_C_COMPILER="$cc" \
    -DKVQ_SNIPPET="$snippet" -DKVQ_CUDA=OFF -DKVQ_BUILD_MODEL=OFF > "$tmp/sub.log" 2>&1 || { cat "$tmp/sub.log"; die "configure"; }
"$cmake" --build "$tmp/sub" -j2 > "$tmp/sub-build.log" 2>&1 || { cat "$tmp/sub-build.log"; die "build"; }
run_check "$tmp/sub/app_shared" shared "$tmp/sub/kvq/src/core"
run_check "$tmp/sub/app_static" static

[ "$skip" = 0 ] || exit 77
echo "install test passed"
