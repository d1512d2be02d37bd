#include <cstdio>
int main() { std::puts("benchmark: see bench/README"); return 0; }
