// The one "throws naming X" check of the test suite.
#pragma once

#include <catch2/catch.hpp>
#include <initializer_list>
#include <stdexcept>
#include <string>

/// Runs f, which must throw E (a prefloss error, so also std::invalid_argument) whose message
/// starts with "<fn>:" and holds every needle (argument names, shapes, values seen).
template <class E, class F>
void expect_throw(F&& f, const std::string& fn, std::initializer_list<std::string> needles) {
  static_assert(std::is_base_of_v<std::invalid_argument, E>, "prefloss errors derive from std::invalid_argument");
  try {
    f();
    FAIL("no exception; expected " << fn);
  } catch (const E& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.rfind(fn + ":", 0) == 0);
    for (const std::string& n : needles) CHECK(what.find(n) != std::string::npos);
  }
}
