// The extension's one translation unit. Every file below includes the torch headers, and
// parsing them dominated the build: five units took ~130 s on 2 cores, one takes ~66 s on
// one core, and the AVX2 and scalar builds (tests) then run side by side. The files share
// one anonymous namespace, so a helper name used in two of them fails to compile.
#include "int8_linear.cpp"
#include "lut_linear.cpp"
#include "hadamard.cpp"
#include "ops.cpp"
#include "module.cpp"
